//! The Lua scripts. Refresh and release compare the full lease value before touching the key,
//! so a holder can never extend or delete a lease that is not exactly its own, and neither ever
//! creates a key. Take-over replaces a lease only if it belongs to the holder the caller named
//! (or the key is gone), so it can never take a lease from anyone else.

use fred::types::scripts::Script;

/// `KEYS[1]` = lock key, `ARGV[1]` = our lease value, `ARGV[2]` = ttl in ms.
///
/// Returns `{1}` when refreshed, `{0}` when the key is gone, `{2, value}` when it holds
/// another value.
const REFRESH_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1}
end
if not v then
  return {0}
end
return {2, v}
";

/// `KEYS[1]` = lock key, `ARGV[1]` = our lease value. Returns 1 when deleted, else 0.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// `KEYS[1]` = lock key, `ARGV[1]` = the named holder's prefix `node|nonce|`, `ARGV[2]` = our
/// lease value, `ARGV[3]` = ttl in ms.
///
/// Returns `{1}` when the key was the named holder's (or gone) and is now ours, `{2, value}`
/// when it holds someone else's lease.
const TAKE_OVER_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if (not v) or string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return {1}
end
return {2, v}
";

/// The scripts with their SHA1s computed once.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) refresh: Script,
    pub(crate) release: Script,
    pub(crate) take_over: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            refresh: Script::from_lua(REFRESH_LUA),
            release: Script::from_lua(RELEASE_LUA),
            take_over: Script::from_lua(TAKE_OVER_LUA),
        }
    }
}
