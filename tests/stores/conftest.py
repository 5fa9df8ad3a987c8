"""The stores' tests: a real redis-server (see tests/helpers/redis_server.py)."""

from tests.helpers.redis_server import own_redis, redis_server, stream

__all__ = ["own_redis", "redis_server", "stream"]
