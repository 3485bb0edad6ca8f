"""The serving core: what a request is and how it is served, whatever the
transport. The HTTP adapters (web/) and the gRPC front (rpc/) only parse
their protocol, call this core, and render its answer or failure; it imports
neither Flask nor grpc (import-linter checks it in `make test`).

    pipeline     the one way images become answers: quota, cache, decode, queue, await
    admission    how urgent a request is: priority level and deadline
    keys         who a caller is: the API keys file, the key a request shows
    quotas       each key's quota, counted per image, shared in Redis
    models       the models registry: what this process routes to, learned or configured
    traffic      which version answers: pinned, or the traffic policy in Redis
    workers      the one view of the live workers per process (routing, sizes, probes)
    cache        the shared response cache: look uploads up by hash, store answers
    inference    the v2 protocol's tensor codecs, metadata and `infer`
    explain      why: occlusion through the pipeline, Grad-CAM asked of the worker
    failures     the core's typed failures and the one table of their answers
"""
