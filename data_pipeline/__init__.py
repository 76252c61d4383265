"""Data preparation: talking-head videos to training shards (the data-pipeline issue fills this in)."""
