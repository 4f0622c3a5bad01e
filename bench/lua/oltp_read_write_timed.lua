-- sysbench's own oltp_read_write, with each transaction's end time and
-- latency written to $DBM_LATENCY_DIR/sysbench.<thread> as
-- "<end µs since the epoch> <latency µs> rw" (bench/src/timeline.rs reads
-- them). sysbench's per-second report gives only one percentile; the bench
-- needs p90 and p99 per second, lined up with the migration's events.
-- When the file $DBM_STOP_FILE exists, each thread ends its loop before its
-- next transaction (sysbench ends a thread whose event() returns true) and
-- sysbench prints its summary as at the end of --time: the bench ends the
-- load when it has what it measures.
require("oltp_read_write")

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long dbm_sec; long dbm_nsec; } dbm_timespec;
int clock_gettime(int clock_id, dbm_timespec *tp);
]]
local ts = ffi.new("dbm_timespec")
local CLOCK_REALTIME = 0

local function now_us()
   ffi.C.clock_gettime(CLOCK_REALTIME, ts)
   return tonumber(ts.dbm_sec) * 1000000 + math.floor(tonumber(ts.dbm_nsec) / 1000)
end

local out
local inner_thread_init = thread_init
function thread_init()
   inner_thread_init()
   local dir = os.getenv("DBM_LATENCY_DIR")
   if dir then
      out = assert(io.open(dir .. "/sysbench." .. sysbench.tid, "w"))
      out:setvbuf("line")
   end
end

local stop_file = os.getenv("DBM_STOP_FILE")

local function stopped()
   if not stop_file then
      return false
   end
   local f = io.open(stop_file, "r")
   if f then
      f:close()
      return true
   end
   return false
end

local inner_event = event
function event()
   if stopped() then
      return true
   end
   local t0 = now_us()
   inner_event()
   if out then
      local t1 = now_us()
      out:write(string.format("%.0f %.0f rw\n", t1, t1 - t0))
   end
end

local inner_thread_done = thread_done
function thread_done()
   if out then
      out:close()
      out = nil
   end
   inner_thread_done()
end
