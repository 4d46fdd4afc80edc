-- M1 with 16 clients: each wrk connection POSTs the protocol's payload, keep-alive, one
-- request at a time (wrk does not pipeline). Each thread stops after its share of the
-- messages and creates MARKDIR/done-<thread>; wrk itself only returns after -d or a SIGINT,
-- which the bench sends once every thread is done. `done` prints one JSON line.
-- Usage: wrk -t T -c C -d MAX -s wrk_post.lua URL -- TOKEN PER_THREAD MARKDIR

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  token = args[1]
  per_thread = tonumber(args[2])
  markdir = args[3]
  sent, answered, bad = 0, 0, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. token
end

function request()
  sent = sent + 1
  -- Each message its own recipient (13 digits, as in bench/common.py): one number would
  -- make every message one conversation, sent one after another.
  local body = string.format(
    '{"to":"5511%02d%07d","type":"text","text":"Hello! Your order #48213 has shipped and ' ..
    'should arrive tomorrow. Track it at https://example.com/t/48213",' ..
    '"client_message_id":"c-%02d%08d"}', tid, sent % 10000000, tid, sent)
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  answered = answered + 1
  if status ~= 202 then bad = bad + 1 end
  if answered == per_thread then
    wrk.thread:stop()
    local mark = io.open(string.format("%s/done-%d", markdir, tid), "w")
    mark:close()
  end
end

function done(summary, latency, requests)
  local answered_all, bad_all, sent_all = 0, 0, 0
  for _, t in ipairs(threads) do
    answered_all = answered_all + t:get("answered")
    bad_all = bad_all + t:get("bad")
    sent_all = sent_all + t:get("sent")
  end
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"requests":%d,"answered":%d,"sent":%d,"non_202":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p99":%d,"max":%d}}\n',
    summary.duration, summary.requests, answered_all, sent_all, bad_all,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
