"""Optional middleware for minismtp: filters and limits (imported as minismtp.contrib)."""
