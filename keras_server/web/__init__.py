"""The web process: HTTP in, decoded images onto the queue, answers out.

    app          the Flask app factory: request log, API keys, blueprints, unrouted errors
    api          the JSON routes (/predict, /models, probes, /metrics) and their app state
    v2           the Open Inference Protocol (KServe v2, REST) under /v2
    inference    the v2 protocol without its transport: what REST and gRPC both call
    dispatch     uploads to answers, for every route: decode within the budget, queue, await
    errors       one HttpError (status, message, headers), each API's handlers, the catch-all
    deployment   the models this web server routes to, across every Redis shard, and
                 those it learns from the workers' registry (--models-from workers)
    routing      which version answers a request: pinned, or the traffic policy in Redis
    admin        the admin API (--admin-keys): versions and traffic while serving
    response_cache the shared response cache: look uploads up by hash, store answers
    uploads      the files of a multipart upload (python-multipart)
    auth         API keys (--api-keys): checked before every route; the keys file
    quotas       quotas per API key: admit or 429, RateLimit-* headers
    cors         CORS (--cors-origins): preflights, headers on every answer
    page         the upload page at / and the OpenAPI description
    jobs         asynchronous jobs: POST /jobs, GET and DELETE /jobs/<id>
    archives     a job's zip or tar: its files, with the unsafe ones refused
    front        the HTTP server (granian) for --role web and all, from our settings

Never imports an engine or the worker (import-linter checks it in `make test`).
"""
