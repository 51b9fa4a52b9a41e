//! The connection to Redis: one primary, or a Redis Cluster.
//!
//! `store.url` names one node (`redis://host:6379/`, `rediss://` for TLS) or several, separated
//! by commas (`redis://a:6379,b:6379,c:6379`): the seed nodes of a cluster. One URL that turns
//! out to be a cluster node (`INFO cluster` says `cluster_enabled:1`) is a cluster too, with that
//! node as its seed. Which it is gets decided once, on the first connection.
//!
//! - One primary: one multiplexed, auto-reconnecting connection ([`ConnectionManager`]).
//! - A cluster: the redis crate's cluster client, which learns the slot map from the seeds,
//!   follows `MOVED`/`ASK`, and keeps one multiplexed connection per node. Each script goes to
//!   the node that owns its keys' slot: the store gives every script keys of one slot
//!   (`cluster.rs`).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// A connection to one primary or to a cluster. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Whether this is a cluster, whose scripts must keep to one slot each.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The nodes `url` names: one URL, or a comma-separated list of a cluster's seed nodes. An item
/// without a scheme (`b:6379`) takes the first one's scheme and credentials. Errors say what
/// is wrong without repeating the URL (it may hold a password).
pub(super) fn node_urls(url: &str) -> Result<Vec<String>, String> {
    let mut items = url.split(',').map(str::trim);
    let first = items.next().unwrap_or_default();
    let Some((scheme, rest)) = first.split_once("://") else {
        return Err("is not a Redis URL".to_owned());
    };
    let credentials = rest
        .split('/')
        .next()
        .and_then(|authority| authority.rsplit_once('@'))
        .map(|(credentials, _)| credentials);
    let mut nodes = vec![first.to_owned()];
    for item in items {
        if item.is_empty() {
            return Err("has an empty node in its comma-separated list".to_owned());
        }
        if scheme == "redis+unix" || item.starts_with("redis+unix://") {
            return Err(
                "lists several nodes, and one is a Unix socket: a Redis Cluster is \
                        reached over TCP"
                    .to_owned(),
            );
        }
        nodes.push(match (item.contains("://"), credentials) {
            (true, _) => item.to_owned(),
            (false, Some(credentials)) => format!("{scheme}://{credentials}@{item}"),
            (false, None) => format!("{scheme}://{item}"),
        });
    }
    Ok(nodes)
}

/// Connects to what `nodes` name (see the module docs), with `timeout` to connect and per reply.
pub(super) async fn connect(nodes: &[redis::Client], timeout: Duration) -> RedisResult<Conn> {
    if let [node] = nodes
        && !is_cluster_node(node, timeout).await?
    {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        return Ok(Conn::Single(ConnectionManager::new_lazy_with_config(
            node.clone(),
            config,
        )?));
    }
    let cluster = ClusterClientBuilder::new(nodes.iter().map(|n| n.get_connection_info().clone()))
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(1)
        .build()?;
    Ok(Conn::Cluster(cluster.get_async_connection().await?))
}

/// Whether `node` is a cluster node (`INFO cluster`). A server that refuses `INFO` (an ACL
/// without it) is taken for a primary.
async fn is_cluster_node(node: &redis::Client, timeout: Duration) -> RedisResult<bool> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut conn = node
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    match redis::cmd("INFO")
        .arg("cluster")
        .query_async::<String>(&mut conn)
        .await
    {
        Ok(info) => Ok(info.lines().any(|line| line.trim() == "cluster_enabled:1")),
        Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::node_urls;

    #[test]
    fn one_url_is_one_node() {
        assert_eq!(
            node_urls("redis://127.0.0.1:6379/").unwrap(),
            ["redis://127.0.0.1:6379/"]
        );
    }

    #[test]
    fn a_list_names_a_cluster_s_seeds() {
        assert_eq!(
            node_urls("rediss://:pw@a:7000,b:7001, rediss://c:7002").unwrap(),
            [
                "rediss://:pw@a:7000",
                "rediss://:pw@b:7001",
                "rediss://c:7002"
            ]
        );
        assert_eq!(
            node_urls("redis://a:7000,b:7001").unwrap(),
            ["redis://a:7000", "redis://b:7001"]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// The configuration check and the store read `store.url` alike: whatever list the
        /// check accepts, the store splits into nodes that each parse as a Redis URL, and
        /// building the store answers (a `store.url` error at worst, such as nodes that disagree
        /// on TLS), never panics.
        #[test]
        fn what_the_configuration_accepts_the_store_reads(
            items in proptest::collection::vec(
                proptest::sample::select(vec![
                    "redis://127.0.0.1:7000",
                    "rediss://:pw@a.example:7001",
                    "redis://user:pw@b.example:7002/0",
                    "c.example:7003",
                    " d.example:7004 ",
                    "",
                    "redis+unix:///tmp/redis.sock",
                    "http://e.example:1",
                    "rediss://f.example",
                ]),
                1..5,
            )
        ) {
            let url = items.join(",");
            let accepted = crate::config::Config::builder().store_url(url.clone()).build().is_ok();
            if accepted {
                let nodes = node_urls(&url).expect("the check accepted it");
                proptest::prop_assert_eq!(nodes.len(), items.len());
                for node in &nodes {
                    proptest::prop_assert!(redis::Client::open(node.as_str()).is_ok(), "{}", node);
                }
                let built = super::super::RedisStore::new(&url, "p", std::time::Duration::from_secs(1));
                let answered = matches!(
                    built,
                    Ok(_) | Err(crate::config::ConfigError::Invalid { key: "store.url", .. })
                );
                proptest::prop_assert!(answered, "the store refused the URL another way");
            }
        }
    }

    #[test]
    fn bad_lists_are_refused_without_echoing_the_url() {
        for url in [
            "redis://a:1,,b:2",
            "redis+unix:///tmp/r.sock,b:2",
            "a:1,b:2",
        ] {
            let error = node_urls(url).unwrap_err();
            assert!(!error.contains("a:1") && !error.contains("/tmp"), "{error}");
        }
    }
}
