//! [`RequestInfo`]: what hooks and the cluster see of an HTTP/upgrade request.

use std::net::SocketAddr;

/// The parts of an HTTP request that outlive it (copied once at upgrade).
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// Request path (without the query).
    pub path: String,
    /// Raw query string (without `?`), empty if none.
    pub query: String,
    /// Headers as (lower-case name, value) pairs; non-UTF-8 values are dropped.
    pub headers: Vec<(String, String)>,
    /// The peer address of the TCP connection.
    pub remote_addr: Option<SocketAddr>,
}

impl RequestInfo {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Query parameters as decoded (name, value) pairs.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect()
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
    fn decodes_queries() {
        let r = RequestInfo {
            query: "token=a%20b&x=1+2&flag&bad=%zz&end=%4".into(),
            ..Default::default()
        };
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
