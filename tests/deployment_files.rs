//! The shipped deployment files (docker-compose.yml, k8s/, deploy/haproxy.cfg, Dockerfile) agree
//! with the binary (docs/deployment.md): they parse, every `HEARTH_*` variable they name is a
//! real setting, the ports and probe paths they use are served, probes and shutdown timing fit
//! together, no credentials ship, and the ingress targets the Service's port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use hearth::Config;
use serde_yaml::Value;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every YAML document of `path`, with merge keys (`<<`) applied.
fn yaml_docs(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let mut v = Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}"));
            v.apply_merge().unwrap_or_else(|e| panic!("{path}: {e}"));
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize as _;

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[k],
    })
}

fn str_of<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path}: not a string: {:?}", get(v, path)))
}

fn int_of(v: &Value, path: &str) -> u64 {
    let x = get(v, path);
    x.as_u64()
        .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("{path}: not a number: {x:?}"))
}

/// Every `HEARTH_[A-Z0-9_]+` word in `text` (values, keys and comments alike).
fn hearth_variables(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("HEARTH_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].trim_end_matches('_').to_owned());
        rest = &tail[end..];
    }
    out
}

/// The port of an `ip:port` setting default.
fn default_port(setting: &str) -> u16 {
    let (_, _, default) = Config::reference()
        .into_iter()
        .find(|(name, _, _)| *name == setting)
        .unwrap();
    default
        .trim_matches('"')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn every_hearth_variable_named_is_a_setting() {
    let settings: BTreeSet<&str> = Config::reference().iter().map(|(_, env, _)| *env).collect();
    // not settings, but read by `hearth` itself
    let extra = ["HEARTH_ADMIN_TOKEN"];
    for file in [
        "docker-compose.yml",
        "k8s/hearth.yaml",
        "k8s/ingress.yaml",
        "Dockerfile",
        "deploy/haproxy.cfg",
    ] {
        for var in hearth_variables(&read(file)) {
            assert!(
                settings.contains(var.as_str()) || extra.contains(&var.as_str()),
                "{file} names {var}, which is no setting of hearth"
            );
        }
    }
}

#[test]
fn compose_builds_one_image_and_ships_no_credentials() {
    let docs = yaml_docs("docker-compose.yml");
    let [compose] = &docs[..] else {
        panic!("one document expected")
    };
    let services = get(compose, "services").as_mapping().unwrap();
    let hearth: Vec<(&str, &Value)> = services
        .iter()
        .map(|(k, v)| (k.as_str().unwrap(), v))
        .filter(|(k, _)| k.starts_with("hearth"))
        .collect();
    assert_eq!(hearth.len(), 3, "three replicas");
    let builds = hearth.iter().filter(|(_, s)| !s["build"].is_null()).count();
    assert_eq!(builds, 1, "the image is built once, by one service");
    let images: BTreeSet<&str> = hearth.iter().map(|(_, s)| str_of(s, "image")).collect();
    assert_eq!(
        images.len(),
        1,
        "every replica runs the same image: {images:?}"
    );
    let mut ids = BTreeSet::new();
    for (name, s) in &hearth {
        let env = get(s, "environment");
        assert_eq!(str_of(env, "HEARTH_LOG_FORMAT"), "json", "{name}");
        ids.insert(str_of(env, "HEARTH_NODE_ID"));
        let check: Vec<&str> = get(s, "healthcheck.test")
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(check, ["CMD", "/usr/local/bin/hearth", "health"], "{name}");
        // required from the environment, never a literal
        assert!(
            str_of(env, "HEARTH_CLUSTER_SECRET").starts_with("${HEARTH_CLUSTER_SECRET:?"),
            "{name}"
        );
        assert!(
            str_of(env, "HEARTH_DATABASE_URL").contains("${POSTGRES_PASSWORD:?"),
            "{name}: the database password comes from POSTGRES_PASSWORD"
        );
    }
    assert_eq!(ids.len(), 3, "distinct node ids");
    let pg = get(compose, "services.postgres.environment");
    assert!(str_of(pg, "POSTGRES_PASSWORD").starts_with("${POSTGRES_PASSWORD:?"));
    // the balancer checks /readyz on the port the replicas listen on
    let haproxy = read("deploy/haproxy.cfg");
    assert!(haproxy.contains("option httpchk GET /readyz"));
    let port = default_port("listen");
    for (name, _) in &hearth {
        assert!(
            haproxy.contains(&format!("{name}:{port} check")),
            "haproxy.cfg: {name}:{port}"
        );
    }
}

/// The Deployment's container and pod spec.
fn deployment() -> (Value, Value) {
    let docs = yaml_docs("k8s/hearth.yaml");
    let kinds: Vec<&str> = docs.iter().map(|d| str_of(d, "kind")).collect();
    assert!(
        !kinds.contains(&"Secret"),
        "k8s/hearth.yaml must ship no Secret (credentials are created with kubectl): {kinds:?}"
    );
    let d = docs
        .iter()
        .find(|d| str_of(d, "kind") == "Deployment")
        .unwrap();
    let pod = get(d, "spec.template.spec").clone();
    let containers = get(&pod, "containers").as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    (pod.clone(), containers[0].clone())
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    get(container, "env")
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| str_of(e, "name") == name)
        .and_then(|e| e["value"].as_str())
}

#[test]
fn kubernetes_probes_and_shutdown_timing_fit() {
    let (pod, c) = deployment();
    assert_eq!(env_value(&c, "HEARTH_LOG_FORMAT"), Some("json"));
    let ports: Vec<(&str, u64)> = get(&c, "ports")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (str_of(p, "name"), int_of(p, "containerPort")))
        .collect();
    let port_of = |name: &str| ports.iter().find(|(n, _)| *n == name).map(|(_, p)| *p);
    assert_eq!(port_of("ws"), Some(u64::from(default_port("listen"))));
    let operator = env_value(&c, "HEARTH_OPERATOR_LISTEN").unwrap();
    assert_eq!(
        port_of("operator").map(|p| p.to_string()),
        operator.rsplit(':').next().map(str::to_owned)
    );
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let p = get(&c, probe);
        assert!(!p.is_null(), "{probe} missing");
        // /readyz and /healthz answer from memory; 1 s (the default) is enough, 3 s is explicit
        assert!(int_of(p, "timeoutSeconds") >= 2, "{probe}.timeoutSeconds");
        assert!(
            int_of(p, "failureThreshold") >= 1,
            "{probe}.failureThreshold"
        );
        assert!(
            port_of(str_of(p, "httpGet.port")).is_some(),
            "{probe} names a port the container does not have"
        );
        let path = str_of(p, "httpGet.path");
        assert!(["/readyz", "/healthz"].contains(&path), "{probe}: {path}");
    }
    assert_eq!(str_of(&c, "readinessProbe.httpGet.path"), "/readyz");
    // the readiness probe's patience is shorter than the outage the node waits out itself:
    // a node that is not ready leaves the Service within readiness_outage_ms + period × threshold
    let outage_ms: u64 = env_value(&c, "HEARTH_READINESS_OUTAGE_MS")
        .unwrap()
        .parse()
        .unwrap();
    assert!(outage_ms > 0);
    // preStop sleep + shutdown timeout fit in the grace period, with room to exit
    let pre_stop: Vec<&str> = get(&c, "lifecycle.preStop.exec.command")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let [sleep, secs] = pre_stop[..] else {
        panic!("preStop: {pre_stop:?}")
    };
    assert_eq!(sleep, "sleep");
    let sleep_s: u64 = secs.parse().unwrap();
    assert!((1..=15).contains(&sleep_s), "preStop sleep {sleep_s}");
    let shutdown_ms: u64 = env_value(&c, "HEARTH_SHUTDOWN_TIMEOUT_MS")
        .unwrap()
        .parse()
        .unwrap();
    let grace = int_of(&pod, "terminationGracePeriodSeconds");
    assert!(
        sleep_s * 1000 + shutdown_ms + 2000 <= grace * 1000,
        "preStop {sleep_s} s + shutdown {shutdown_ms} ms + 2 s exceed the grace period {grace} s"
    );
    // credentials come from Secrets created by hand
    let from: Vec<&str> = get(&c, "envFrom")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| str_of(e, "secretRef.name"))
        .collect();
    assert_eq!(from, ["hearth"]);
    let text = read("k8s/hearth.yaml");
    assert!(text.contains("kubectl create secret generic hearth "));
    assert!(text.contains("kubectl create secret generic hearth-cluster-secret"));
}

#[test]
fn the_ingress_targets_the_service_port_with_websocket_timeouts() {
    let docs = yaml_docs("k8s/hearth.yaml");
    let service = docs
        .iter()
        .find(|d| str_of(d, "kind") == "Service")
        .unwrap();
    let ingress = yaml_docs("k8s/ingress.yaml");
    let [ingress] = &ingress[..] else {
        panic!("one document expected")
    };
    assert_eq!(str_of(ingress, "kind"), "Ingress");
    assert_eq!(str_of(ingress, "spec.ingressClassName"), "nginx");
    let notes = get(ingress, "metadata.annotations").as_mapping().unwrap();
    let note = |k: &str| {
        notes
            .get(format!("nginx.ingress.kubernetes.io/{k}"))
            .and_then(Value::as_str)
    };
    for k in ["proxy-read-timeout", "proxy-send-timeout"] {
        let secs: u64 = note(k).unwrap().parse().unwrap();
        assert!(secs >= 3600, "{k}: {secs}");
    }
    assert!(note("affinity").is_none(), "no session affinity");
    let backend = get(ingress, "spec.rules.0.http.paths.0.backend.service");
    assert_eq!(str_of(backend, "name"), str_of(service, "metadata.name"));
    let port = str_of(backend, "port.name");
    let service_ports: Vec<&str> = get(service, "spec.ports")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| str_of(p, "name"))
        .collect();
    assert!(
        service_ports.contains(&port),
        "{port} not in {service_ports:?}"
    );
    assert_eq!(str_of(service, "spec.sessionAffinity"), "None");
}

#[test]
fn the_dockerfile_exposes_the_listen_port_and_checks_health() {
    let text = read("Dockerfile");
    let port = default_port("listen");
    assert!(text.contains(&format!("EXPOSE {port}")));
    assert!(text.contains(&format!("ENV HEARTH_LISTEN=0.0.0.0:{port}")));
    assert!(text.contains(r#"CMD ["/usr/local/bin/hearth", "health"]"#));
}

/// Every probe path the files use is served by the binary: 200 on the client port (readiness,
/// liveness) and on the operator listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_paths_are_served() {
    let (_, c) = deployment();
    let mut paths = BTreeSet::new();
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        paths.insert(str_of(&c, &format!("{probe}.httpGet.path")).to_owned());
    }
    paths.insert("/readyz".to_owned()); // haproxy.cfg's httpchk
    paths.insert("/healthz".to_owned()); // `hearth health`
    let s = start(test_config()).await;
    for path in &paths {
        assert_eq!(http_get(s.addr, path).await.0, 200, "client port {path}");
        assert_eq!(
            http_get(s.operator_addr(), path).await.0,
            200,
            "operator {path}"
        );
    }
    s.stop().await;
}
