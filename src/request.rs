//! [`RequestInfo`]: what hooks and the cluster see of an HTTP/upgrade request.

use std::net::SocketAddr;

/// The parts of an HTTP request that outlive it: path, query, headers and peer address,
/// copied once at the upgrade into one buffer (a socket keeps them for its whole life, for
/// the hooks, so they are packed rather than kept as a string per header).
#[derive(Clone, Default)]
pub struct RequestInfo {
    /// The path, the query, then each header's name and value, back to back.
    text: Box<str>,
    /// Where each part ends in `text`: the path, the query, then a name and a value per header.
    ends: Box<[u32]>,
    remote_addr: Option<SocketAddr>,
}

impl RequestInfo {
    /// A request of `path` (without the query), `query` (without `?`, empty if none), the
    /// `headers` as (lower-case name, value) pairs in order, and the peer address.
    pub fn new<'a>(
        path: &str,
        query: &str,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        remote_addr: Option<SocketAddr>,
    ) -> Self {
        let headers: Vec<(&str, &str)> = headers.into_iter().collect();
        let len = path.len()
            + query.len()
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let mut text = String::with_capacity(len);
        let mut ends = Vec::with_capacity(2 + 2 * headers.len());
        let parts = [path, query]
            .into_iter()
            .chain(headers.iter().flat_map(|(k, v)| [*k, *v]));
        for part in parts {
            // a request is bounded far below 4 GiB by the HTTP parser; past that, parts are
            // left out whole rather than cut
            let Ok(end) = u32::try_from(text.len() + part.len()) else {
                break;
            };
            text.push_str(part);
            ends.push(end);
        }
        if ends.len() > 2 && ends.len() % 2 == 1 {
            ends.pop(); // a header whose value was left out goes with it
        }
        Self {
            text: text.into_boxed_str(),
            ends: ends.into_boxed_slice(),
            remote_addr,
        }
    }

    /// The `i`-th part of `text` (see [`RequestInfo::ends`]), empty when absent.
    fn part(&self, i: usize) -> &str {
        let start = match i {
            0 => 0,
            _ => self.ends.get(i - 1).map_or(0, |e| *e as usize),
        };
        let end = self.ends.get(i).map_or(start, |e| *e as usize);
        self.text.get(start..end).unwrap_or_default()
    }

    /// Request path (without the query).
    pub fn path(&self) -> &str {
        self.part(0)
    }

    /// Raw query string (without `?`), empty if none.
    pub fn query(&self) -> &str {
        self.part(1)
    }

    /// Headers as (lower-case name, value) pairs, in request order; values that are not
    /// UTF-8 are left out.
    pub fn headers(
        &self,
    ) -> impl DoubleEndedIterator<Item = (&str, &str)> + ExactSizeIterator + '_ {
        let count = self.ends.len().saturating_sub(2) / 2;
        (0..count).map(|h| (self.part(2 + 2 * h), self.part(3 + 2 * h)))
    }

    /// The peer address of the TCP connection.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Query parameters as decoded (name, value) pairs.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect()
    }
}

impl std::fmt::Debug for RequestInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestInfo")
            .field("path", &self.path())
            .field("query", &self.query())
            .field("headers", &self.headers().collect::<Vec<_>>())
            .field("remote_addr", &self.remote_addr)
            .finish()
    }
}

/// Decodes `%XX` escapes and `+` (form encoding); invalid escapes are kept verbatim.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_every_part_in_order() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap_or_else(|_| unreachable!());
        let r = RequestInfo::new(
            "/collab",
            "a=1",
            [("host", "x"), ("cookie", ""), ("x-a", "1"), ("X-A", "2")],
            Some(addr),
        );
        assert_eq!(r.path(), "/collab");
        assert_eq!(r.query(), "a=1");
        assert_eq!(
            r.headers().collect::<Vec<_>>(),
            [("host", "x"), ("cookie", ""), ("x-a", "1"), ("X-A", "2")]
        );
        assert_eq!(r.header("x-a"), Some("1"), "the first of a repeated header");
        assert_eq!(r.header("COOKIE"), Some(""));
        assert_eq!(r.header("missing"), None);
        assert_eq!(r.remote_addr(), Some(addr));
        let empty = RequestInfo::default();
        assert_eq!((empty.path(), empty.query()), ("", ""));
        assert_eq!(empty.headers().count(), 0);
        let bare = RequestInfo::new("", "", [], None);
        assert_eq!(
            (bare.path(), bare.query(), bare.headers().count()),
            ("", "", 0)
        );
    }

    #[test]
    fn decodes_queries() {
        let r = RequestInfo::new("/", "token=a%20b&x=1+2&flag&bad=%zz&end=%4", [], None);
        assert_eq!(
            r.query_pairs(),
            vec![
                ("token".into(), "a b".into()),
                ("x".into(), "1 2".into()),
                ("flag".into(), String::new()),
                ("bad".into(), "%zz".into()),
                ("end".into(), "%4".into())
            ]
        );
    }
}
