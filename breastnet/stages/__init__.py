"""Pipeline stages: each module has ``run(cfg) -> dict[str, float]`` and reads/writes work_dir."""
