"""Scale-out on existing engines: FSDP2 sharding (fsdp.py), trainer-to-engine weight sync that cannot hang (sync.py),
a rollout queue bounded by staleness (staleness.py) and Ray placement of the roles (placement.py, ray_backend.py)."""
