//! The Lua scripts. Both compare the full lease value before touching the key, so a holder can
//! never extend or delete a lease that is not exactly its own, and neither script ever creates
//! a key.

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

/// The scripts with their SHA1s computed once.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) refresh: Script,
    pub(crate) release: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            refresh: Script::from_lua(REFRESH_LUA),
            release: Script::from_lua(RELEASE_LUA),
        }
    }
}
