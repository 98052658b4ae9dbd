# ruff: noqa: E501, SIM115
import json
import sys

rows = json.load(open("verdicts.json"))
data = {
    "source": {
        "repository": "https://github.com/Openpanel-dev/openpanel",
        "commit": "ed7bdddbadbe556719ac4b08963905a2de717ddd",
        "commit_date": "2026-08-22",
        "schema": "zTrackHandlerPayload.and(z.object({clientId, clientSecret})) of apps/api/src/routes/track.router.ts "
        "(packages/validation/src/track.validation.ts, event-blocklist.ts)",
        "run_with": "Node v22.20.0 (NODE_VERSION of apps/api/Dockerfile; URL parser ada 2.9.2; Node v20.20.2 gave the same verdicts), fastify 5.8.5 (default JSON parser, bodyLimit 500 MiB as apps/api/src/app.ts), fastify-zod-openapi 5.6.1, "
        "zod 4.3.6; each body POSTed with fastify.inject as application/json",
        "generated": "2026-12-03",
    },
    "columns": {
        "body": "the request body, as op-celery would send it (compact, ASCII-escaped JSON)",
        "status": "OpenPanel's answer: 200 accepted, 400 refused",
        "message": "the server's 400 message (fastify + zod), empty when accepted",
        "op_celery": "absent: op-celery must agree with the server; 'refuses': deliberately stricter, see 'why'",
    },
    "cases": [
        {k: r[k] for k in ("id", "note", "body", "status", "message", "op_celery", "why") if k in r}
        for r in rows
    ],
}
with open(sys.argv[1], "w") as f:
    json.dump(data, f, indent=1, ensure_ascii=True)
    f.write("\n")
print(len(rows))
