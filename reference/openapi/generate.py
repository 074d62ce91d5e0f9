# Writes openapi.json next to this file: the shard manager's API description,
# served at /openapi.json and /docs. Edit here, run python3 generate.py, commit
# both; a test checks that every path it lists is routed.
import json
E={"$ref":"#/components/schemas/Error"}
def op(summary, tag, auth=True, body=None, responses=None, params=None, key=False):
    o={"summary":summary,"tags":[tag]}
    if not auth: o["security"]=[]
    ps=[]
    if key: ps.append({"$ref":"#/components/parameters/IdempotencyKey"})
    if params: ps+=params
    if ps: o["parameters"]=ps
    if body: o["requestBody"]={"required":True,"content":{"application/json":{"schema":body}}}
    r={}
    for code,desc in (responses or {"200":"OK"}).items():
        r[code]={"description":desc}
        if code[0] in "45": r[code]["content"]={"application/json":{"schema":E}}
    o["responses"]=r
    return o
def path(name): return {"name":name,"in":"path","required":True,"schema":{"type":"string"}}
obj=lambda props,req=(): {"type":"object","properties":props,"required":list(req),"additionalProperties":False}
s={"type":"string"}; i={"type":"integer","format":"int64"}; b={"type":"boolean"}
amount_props={"amount":{"type":"string","description":"decimal text of the major unit, e.g. \"4.50\""},"amount_minor":{"type":"integer","format":"int64","description":"integer minor units, e.g. 450"}}
account_body=obj({"id":s,"owner":{"type":"string","description":"admins only: the user who may pay from it"},"currency":s,"opening_balance":{"type":"string"},"opening_balance_minor":i},["id"])
transfer_body=obj({"from":s,"to":s,"currency":s,**amount_props},["from","to"])
common={"401":"missing, invalid, expired or revoked token","403":"not allowed for this caller","422":"invalid input","429":"rate limited (Retry-After)","503":"a shard, the session store or (split) the fraud or auth service is unavailable; nothing changed, retry"}
spec={
 "openapi":"3.0.3",
 "info":{"title":"shardpay reference payment system","version":"1","description":"The reference system's API: the routes of its six services. Run as one process (shardpay serve) all of them answer on one port; run as six (shardpay serve <service>) each service answers its own: auth 8001, ledger 8002, fraud 8003, notification 8004, analytics 8005, shard manager 8006. Money is integer minor units with a currency; amounts go in as decimal text or minor units. Errors are {\"error\":{\"code\",\"message\"}}. With auth on, send Authorization: Bearer <access token> from POST /v1/auth/login."},
 "servers":[{"url":"http://127.0.0.1:8006"}],
 "security":[{"bearer":[]}],
 "components":{
  "securitySchemes":{"bearer":{"type":"http","scheme":"bearer","bearerFormat":"JWT"}},
  "parameters":{"IdempotencyKey":{"name":"Idempotency-Key","in":"header","required":False,"schema":{"type":"string","maxLength":255},"description":"Same key and body replays the first answer; same key, other body: 422; while the first runs: 409."}},
  "schemas":{"Error":obj({"error":obj({"code":s,"message":s},["code","message"])},["error"])}},
 "paths":{
  "/v1/auth/register":{"post":op("Register a user (role admin or service: admins only)","auth",auth=False,body=obj({"username":s,"password":s,"role":{"type":"string","enum":["user","admin","service"]}},["username","password"]),responses={"201":"registered","409":"username taken","422":"invalid username or weak password"})},
  "/v1/auth/login":{"post":op("Log in: access and refresh tokens","auth",auth=False,body=obj({"username":s,"password":s},["username","password"]),responses={"200":"tokens","401":"wrong username or password","429":"too many attempts (Retry-After)"})},
  "/v1/auth/refresh":{"post":op("Trade a refresh token (works once) for new tokens","auth",auth=False,body=obj({"refresh_token":s},["refresh_token"]),responses={"200":"tokens","401":"refresh token used, revoked or expired"})},
  "/v1/auth/logout":{"post":op("Revoke this session and its tokens","auth",responses={"204":"logged out","401":"no valid token"})},
  "/v1/auth/logout-all":{"post":op("Log out everywhere: revoke every session of the caller (admins: of the user named) and all their tokens","auth",body=obj({"username":s}),responses={"200":"username and sessions revoked",**common})},
  "/v1/auth/me":{"get":op("Who the token belongs to","auth",responses={"200":"username and role","401":"no valid token"})},
  "/v1/auth/owners":{"post":op("Record owners of accounts that have none yet; per pair, whether that owner owns it now (service, admin: the other services of a split deployment). check_only: record nothing, answer whether each account is free for its owner","auth",body=obj({"pairs":{"type":"array","maxItems":1000,"items":obj({"account":s,"owner":s},["account","owner"])},"check_only":b},["pairs"]),responses={"200":"owned: one boolean per pair",**common})},
  "/v1/auth/owners/{account}":{"get":op("The owner of an account, or null (service, admin)","auth",params=[path("account")],responses={"200":"account and owner",**common}),
                               "put":op("Give an account without an owner to a registered user (admin); owners never change once set","auth",params=[path("account")],body=obj({"owner":s},["owner"]),responses={"200":"account and owner","404":"no such account","409":"another user owns it",**common})},
  "/v1/accounts":{"post":op("Create an account (users: their own, unfunded; admins: any owner and opening balance)","accounts",key=True,body=account_body,responses={"201":"created","409":"account exists",**common}),
                  "get":op("List accounts, by id (admin, service)","accounts",params=[{"name":"after","in":"query","schema":s},{"name":"limit","in":"query","schema":{"type":"integer","maximum":1000}}],responses={"200":"a page: data, next_after",**common})},
  "/v1/accounts/bulk":{"post":op("Create up to 500 accounts, each answering for itself (admin)","accounts",body=obj({"accounts":{"type":"array","items":account_body,"maxItems":500}},["accounts"]),responses={"200":"results, one per account",**common})},
  "/v1/accounts/{id}":{"get":op("One account: balance, shard (its owner, admin, service)","accounts",params=[path("id")],responses={"200":"the account","404":"no such account",**common})},
  "/v1/transfers":{"post":op("Move money (only the payer's owner)","transfers",key=True,body=transfer_body,responses={"201":"completed","202":"pending: recovery completes it","404":"no such payer or payee",**common,"403":"transfer blocked by fraud checks, or not the payer's owner","409":"same key still running","422":"invalid input, insufficient funds, currency mismatch, or failed (credit refused, debit reversed)"})},
  "/v1/transfers/lookup":{"post":op("Look up to 1000 transfers by id (admin, service)","transfers",body=obj({"ids":{"type":"array","items":s,"maxItems":1000}},["ids"]),responses={"200":"found and missing",**common})},
  "/v1/transfers/{id}":{"get":op("One transfer (payer's or payee's owner, admin, service)","transfers",params=[path("id")],responses={"200":"the transfer","404":"no such transfer",**common})},
  "/v1/shards":{"get":op("Per shard: health, accounts, balances, transfers by state (admin, service)","operations",responses={"200":"shards",**common})},
  "/v1/audit":{"get":op("Prove no money was created, lost or paid twice (admin)","operations",responses={"200":"the audit report",**common})},
  "/v1/accounts/{id}/entries":{"get":op("An account's statement: its ledger entries, oldest first, a page at a time (its owner, admin, service; the ledger service)","ledger",params=[path("id"),{"name":"after","in":"query","schema":i},{"name":"limit","in":"query","schema":{"type":"integer","maximum":1000}}],responses={"200":"account, entries, next_after","404":"no such account",**common})},
  "/v1/ledger/trial-balance":{"get":op("Per shard: sum of entries per currency (zero when balanced), balance totals per kind of account, money sent into and taken out of flight (admin, service)","ledger",responses={"200":"shards",**common})},
  "/v1/ledger/relay":{"get":op("What this process's outbox relay has published, and its failed passes (admin, service)","ledger",responses={"200":"counts",**common})},
  "/v1/fraud/score":{"post":op("Score a transfer: allow, review or block, with reasons (service, admin); publish: true also publishes the decision (the shard manager asks so)","fraud",body=obj({"from":s,"to":s,**amount_props,"publish":b},["from","to"]),responses={"200":"decision, score, reasons",**common})},
  "/v1/pipeline":{"get":op("The event pipeline: outbox, published, per consumer applied, duplicates, lag (admin, service)","events",responses={"200":"the pipeline report",**common})},
  "/v1/analytics":{"get":op("Analytics totals per shard and overall, next to the shards' own counts (admin, service)","events",responses={"200":"totals",**common})},
  "/dashboard/analytics":{"get":op("The analytics dashboard (HTML, refreshes itself; with auth on, open it as /dashboard/analytics#token=<admin or service access token>)","events",auth=False)},
  "/v1/webhooks":{"post":op("Register a signed webhook for an account (its owner, admin); the secret is shown once","notifications",body=obj({"account":s,"url":s},["account","url"]),responses={"201":"the webhook and its secret","404":"no such account",**common,"409":"the account has its maximum of 5 webhooks","422":"invalid URL, or not a public address (unless the server allows private networks)"})},
  "/v1/notification/stats":{"get":op("The notification consumer's counts: events applied, deliveries, attempts, dead letters (admin, service)","notifications",responses={"200":"counts",**common})},
  "/v1/dlq":{"get":op("Dead-lettered webhook deliveries (admin)","notifications",responses={"200":"dead letters",**common})},
  "/v1/dlq/replay":{"post":op("Deliver dead letters again: ids, or all (admin)","notifications",body=obj({"ids":{"type":"array","items":s},"all":b}),responses={"200":"what was delivered, skipped, failed",**common})},
  "/ready":{"get":op("Readiness: every shard, the session store, the event bus and the services this one calls answer","operations",auth=False,responses={"200":"ready","503":"what does not answer"})},
  "/metrics":{"get":op("Prometheus metrics (text format)","operations",auth=False)},
  "/health":{"get":op("Liveness (the shard manager's in the modelled system's shape)","operations",auth=False)},
  "/openapi.json":{"get":op("This document","operations",auth=False)},
  "/docs":{"get":op("This document as a page","operations",auth=False)},
 }}
import os
json.dump(spec,open(os.path.join(os.path.dirname(os.path.abspath(__file__)),"openapi.json"),"w"),indent=1)
print(len(spec["paths"]))
