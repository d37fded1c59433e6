//! `hearth cluster owner` and `hearth cluster status`: read-only looks at a running cluster.

use super::*;

/// `hearth cluster owner DOC`: the owning node's id, if any.
pub async fn owner_of(config: &Config, doc: &str) -> Result<Option<String>, ClusterError> {
    let lock = emit::reader_lock(config, redis_client(&config.redis_url).await?)?;
    Ok(lock.holder(doc).await?.map(|h| h.node_id().to_owned()))
}

/// `hearth cluster status`: live nodes as (node id, incarnation).
pub async fn live_nodes(config: &Config) -> Result<Vec<(String, String)>, ClusterError> {
    use fred::interfaces::KeysInterface as _;
    let redis = redis_client(&config.redis_url).await?;
    let keys = hearth_proxy::Keys::new(config.redis_prefix.clone())?;
    let probe = keys.node_key(&NodeId::new("x")?);
    let prefix = probe.strip_suffix('x').unwrap_or(&probe).to_owned();
    let mut cursor = "0".to_owned();
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let (next, batch): (String, Vec<String>) = redis
            .custom(
                fred::cmd!("SCAN"),
                vec![
                    cursor.clone(),
                    "MATCH".into(),
                    format!("{prefix}*"),
                    "COUNT".into(),
                    "500".into(),
                ],
            )
            .await
            .map_err(|e| ClusterError::Redis(e.to_string()))?;
        for key in batch {
            let inc: Option<String> = redis
                .get(&key)
                .await
                .map_err(|e| ClusterError::Redis(e.to_string()))?;
            if let (Some(id), Some(inc)) = (key.strip_prefix(&prefix), inc) {
                out.push((id.to_owned(), inc));
            }
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    out.sort();
    Ok(out)
}
