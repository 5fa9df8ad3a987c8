"""What several test modules share: clients, certificates, backends, the engine driver."""
