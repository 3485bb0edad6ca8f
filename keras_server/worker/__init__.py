"""The model-worker process: claim a batch from Redis, run one forward pass, answer each.

    main          the process assembled: models loaded and warmed up, claim loops built, run
    loop          the claim loop per shard, the lock its loops share, and `serve`
    callbacks     jobs' completion callbacks, delivered from a bounded pool per process

Imports the broker and the engines' interface, never the web tier.
"""
