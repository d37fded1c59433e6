//! `hearth doc …`, `hearth event fire`, `hearth auth …` and `hearth cluster status|owner|drain` through the
//! admin API: each builds one request, prints the answer (or, with `--json`, the API's JSON
//! as is) and returns the exit status of [`super::client::exit`].

use std::io::Read as _;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hyper::Method;
use serde_json::{Value, json};

use super::client::{Client, ClientError, exit, segment};
use crate::config::{AdminArgs, AuthCommand, DocCommand, EventCommand, RevocationArgs};

fn client(a: &AdminArgs) -> Result<Client, ClientError> {
    // the transport waits a little longer than the owner's deadline, so the server's own
    // timeout answer arrives first
    Client::new(
        &a.server,
        &a.token,
        Duration::from_millis(a.timeout_ms.saturating_add(2_000)),
    )
}

fn bad(msg: impl Into<String>) -> ClientError {
    ClientError {
        status: exit::BAD_INPUT,
        message: msg.into(),
    }
}

/// The query string shared by document routes.
fn doc_query(a: &AdminArgs, extra: &[(&str, &str)]) -> String {
    let mut q = vec![format!("timeout_ms={}", a.timeout_ms.clamp(1, 60_000))];
    if a.no_claim {
        q.push("claim=false".into());
    }
    for (k, v) in extra {
        q.push(format!("{k}={}", segment(v)));
    }
    format!("?{}", q.join("&"))
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn read_input(path: &str) -> Result<Vec<u8>, ClientError> {
    if path == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| bad(format!("standard input: {e}")))?;
        Ok(buf)
    } else {
        std::fs::read(path).map_err(|e| bad(format!("{path}: {e}")))
    }
}

/// One request to document route `/v1/documents/{document}{suffix}` with the common query.
async fn doc_call(
    admin: &AdminArgs,
    method: Method,
    document: &str,
    suffix: &str,
    body: Option<&Value>,
) -> Result<Value, ClientError> {
    let path = format!(
        "/v1/documents/{}{suffix}{}",
        segment(document),
        doc_query(admin, &[])
    );
    client(admin)?.call(method, &path, body).await
}

/// Prints the answer as is with `--json`, else the short form `short` gives.
fn report(admin: &AdminArgs, v: &Value, short: impl FnOnce() -> String) {
    if admin.json {
        println!("{v}");
    } else {
        println!("{}", short());
    }
}

/// Runs `hearth doc …`.
pub async fn doc(cmd: DocCommand) -> Result<(), ClientError> {
    match cmd {
        DocCommand::Get {
            document,
            include,
            types,
            admin,
        } => {
            let include = include.unwrap_or_else(|| {
                if admin.json {
                    "json,state,state_vector".into()
                } else {
                    "json".into()
                }
            });
            let mut extra = vec![("include", include.as_str())];
            if let Some(t) = &types {
                extra.push(("types", t.as_str()));
            }
            let path = format!(
                "/v1/documents/{}{}",
                segment(&document),
                doc_query(&admin, &extra)
            );
            let v = client(&admin)?.call(Method::GET, &path, None).await?;
            if admin.json {
                println!("{v}");
            } else {
                print_json(v.get("json").unwrap_or(&v));
            }
            Ok(())
        }
        DocCommand::Apply {
            document,
            update_file,
            ops,
            append_text,
            admin,
        } => {
            let given = [update_file.is_some(), ops.is_some(), append_text.is_some()];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(bad(
                    "give exactly one of --update-file, --ops and --append-text",
                ));
            }
            let (route, body) = if let Some(f) = update_file {
                let bytes = read_input(&f.to_string_lossy())?;
                ("updates", json!({ "update": B64.encode(bytes) }))
            } else if let Some(ops) = ops {
                let text = match ops.strip_prefix('@') {
                    Some(path) => String::from_utf8(read_input(path)?)
                        .map_err(|_| bad(format!("{path}: not UTF-8")))?,
                    None => ops,
                };
                let ops: Value =
                    serde_json::from_str(&text).map_err(|e| bad(format!("--ops: {e}")))?;
                let ops = if ops.is_array() {
                    ops
                } else {
                    Value::Array(vec![ops])
                };
                ("ops", json!({ "ops": ops }))
            } else {
                let [ty, text] = append_text
                    .unwrap_or_default()
                    .try_into()
                    .map_err(|_| bad("--append-text takes TYPE and TEXT"))?;
                (
                    "ops",
                    json!({ "ops": [{ "op": "text.insert", "type": ty, "text": text }] }),
                )
            };
            let path = format!(
                "/v1/documents/{}/{route}{}",
                segment(&document),
                doc_query(&admin, &[])
            );
            let v = client(&admin)?
                .call(Method::POST, &path, Some(&body))
                .await?;
            if admin.json {
                println!("{v}");
            } else {
                println!("applied {}", v.get("applied").unwrap_or(&Value::Null));
            }
            Ok(())
        }
        DocCommand::Broadcast {
            document,
            message,
            admin,
        } => {
            let body = json!({ "message": message });
            let v = doc_call(&admin, Method::POST, &document, "/broadcast", Some(&body)).await?;
            report(&admin, &v, || {
                format!(
                    "sent to {} connections",
                    v.get("connections").unwrap_or(&Value::Null)
                )
            });
            Ok(())
        }
        DocCommand::Close { document, admin } => {
            let v = doc_call(&admin, Method::POST, &document, "/close", Some(&json!({}))).await?;
            report(&admin, &v, || {
                format!(
                    "closed {} connections",
                    v.get("connections").unwrap_or(&Value::Null)
                )
            });
            Ok(())
        }
        DocCommand::Delete { document, admin } => {
            let v = doc_call(&admin, Method::DELETE, &document, "", None).await?;
            report(&admin, &v, || format!("deleted {document}"));
            Ok(())
        }
        DocCommand::List {
            prefix,
            after,
            limit,
            admin,
        } => {
            let mut q = vec![format!("limit={limit}")];
            if !prefix.is_empty() {
                q.push(format!("prefix={}", segment(&prefix)));
            }
            if let Some(a) = &after {
                q.push(format!("after={}", segment(a)));
            }
            let path = format!("/v1/documents?{}", q.join("&"));
            let v = client(&admin)?.call(Method::GET, &path, None).await?;
            if admin.json {
                println!("{v}");
                return Ok(());
            }
            for d in v
                .get("documents")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                println!(
                    "{}\towner={}\tepoch={}\tconnections={}\tstored={}",
                    d.get("name").and_then(Value::as_str).unwrap_or(""),
                    d.get("owner").and_then(Value::as_str).unwrap_or("-"),
                    d.get("epoch").unwrap_or(&Value::Null),
                    d.get("connections").unwrap_or(&Value::Null),
                    d.get("stored").unwrap_or(&Value::Null),
                );
            }
            if let Some(next) = v.get("next").and_then(Value::as_str) {
                eprintln!("more: --after {next}");
            }
            Ok(())
        }
    }
}

/// Runs `hearth event fire`.
pub async fn event(cmd: EventCommand) -> Result<(), ClientError> {
    let EventCommand::Fire {
        document,
        event,
        payload,
        admin,
    } = cmd;
    let mut body = serde_json::Map::new();
    if let Some(p) = payload {
        let text = if p == "-" {
            String::from_utf8(read_input("-")?).map_err(|_| bad("standard input: not UTF-8"))?
        } else {
            p
        };
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("payload is not JSON: {e}")))?;
        body.insert("payload".into(), v);
    }
    let path = format!(
        "/v1/documents/{}/events/{}{}",
        segment(&document),
        segment(&event),
        doc_query(&admin, &[])
    );
    let v = client(&admin)?
        .call(Method::POST, &path, Some(&Value::Object(body)))
        .await?;
    if admin.json {
        println!("{v}");
    } else if let Some(r) = v.get("reply") {
        println!("{r}");
    } else if let Some(b) = v.get("reply_base64").and_then(Value::as_str) {
        let bytes = B64.decode(b).map_err(|e| ClientError {
            status: exit::OTHER,
            message: format!("reply_base64: {e}"),
        })?;
        std::io::Write::write_all(&mut std::io::stdout(), &bytes).map_err(|e| ClientError {
            status: exit::OTHER,
            message: format!("stdout: {e}"),
        })?;
    }
    Ok(())
}

/// `hearth cluster owner DOC` through the admin API.
pub async fn owner(document: &str, admin: &AdminArgs) -> Result<(), ClientError> {
    let path = format!("/v1/documents/{}/owner", segment(document));
    let v = client(admin)?.call(Method::GET, &path, None).await?;
    if admin.json {
        println!("{v}");
        return Ok(());
    }
    match v.get("owner").and_then(Value::as_str) {
        Some(node) => {
            println!("{node}");
            Ok(())
        }
        None => Err(ClientError {
            status: exit::NOT_FOUND,
            message: format!("no node owns {document:?}"),
        }),
    }
}

/// `hearth cluster status` through the admin API.
pub async fn status(admin: &AdminArgs) -> Result<(), ClientError> {
    let v = client(admin)?.call(Method::GET, "/v1/nodes", None).await?;
    if admin.json {
        println!("{v}");
        return Ok(());
    }
    for n in v
        .get("nodes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let node = n.get("node").and_then(Value::as_str).unwrap_or("?");
        match n.get("error").and_then(Value::as_str) {
            Some(e) => println!("{node}\tunreachable: {e}"),
            None => println!(
                "{node}\tdocuments={}\tconnections={}\tdraining={}",
                n.get("documents").unwrap_or(&Value::Null),
                n.get("connections").unwrap_or(&Value::Null),
                n.get("draining").unwrap_or(&Value::Null),
            ),
        }
    }
    Ok(())
}

/// `hearth cluster drain NODE`.
pub async fn drain(node: &str, admin: &AdminArgs) -> Result<(), ClientError> {
    let path = format!("/v1/nodes/{}/drain", segment(node));
    let v = client(admin)?
        .call(Method::POST, &path, Some(&json!({})))
        .await?;
    if admin.json {
        println!("{v}");
    } else {
        println!("draining {node}");
    }
    Ok(())
}

/// The kind and value a `RevocationArgs` names.
fn revocation(what: &RevocationArgs) -> Result<(&'static str, &str), ClientError> {
    match (&what.user, &what.token_id, &what.document) {
        (Some(v), None, None) => Ok(("user", v)),
        (None, Some(v), None) => Ok(("token", v)),
        (None, None, Some(v)) => Ok(("document", v)),
        _ => Err(bad("name exactly one of --user, --token-id and --document")),
    }
}

/// `hearth auth revoke|lift|revocations`.
pub async fn auth(cmd: AuthCommand) -> Result<(), ClientError> {
    match cmd {
        AuthCommand::Revoke { what, ttl_s, admin } => {
            let (kind, value) = revocation(&what)?;
            let mut body = json!({ kind: value });
            if let Some(t) = ttl_s {
                body["ttl_s"] = json!(t);
            }
            let v = client(&admin)?
                .call(Method::POST, "/v1/revocations", Some(&body))
                .await?;
            if admin.json {
                println!("{v}");
            } else {
                let nodes = v.get("nodes").and_then(Value::as_array).map_or(0, Vec::len);
                println!("revoked {kind} {value} on {nodes} node(s)");
                if let Some(u) = v.get("unreachable").and_then(Value::as_array)
                    && !u.is_empty()
                {
                    eprintln!(
                        "not answering (they load it from Redis): {}",
                        Value::from(u.clone())
                    );
                }
            }
            Ok(())
        }
        AuthCommand::Lift { what, admin } => {
            let (kind, value) = revocation(&what)?;
            let path = format!("/v1/revocations/{kind}/{}", segment(value));
            let v = client(&admin)?.call(Method::DELETE, &path, None).await?;
            if admin.json {
                println!("{v}");
            } else {
                println!("lifted {kind} {value}");
            }
            Ok(())
        }
        AuthCommand::Revocations { admin } => {
            let v = client(&admin)?
                .call(Method::GET, "/v1/revocations", None)
                .await?;
            if admin.json {
                println!("{v}");
                return Ok(());
            }
            for r in v
                .get("revocations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(obj) = r.as_object() else { continue };
                for (k, val) in obj {
                    if k != "until_ms" {
                        println!(
                            "{k}\t{}\tuntil_ms={}",
                            val.as_str().unwrap_or_default(),
                            obj.get("until_ms").unwrap_or(&Value::Null)
                        );
                    }
                }
            }
            Ok(())
        }
    }
}
