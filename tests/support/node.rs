//! Extra RabbitMQ nodes beside the shared default one, for tests that need
//! a broker configured their own way (a TLS listener, a cluster).
//!
//! A [`TestNode`] has its own node name, ports, data directory and
//! configuration file, so the default node (`rabbit@localhost`, port 5672)
//! is never touched. It runs as the `rabbitmq` user like the default node
//! (sharing its Erlang cookie, so `rabbitmqctl` reaches it and nodes can be
//! clustered), and is stopped and its files removed when dropped, also
//! when the test panics.
//!
//! ```ignore
//! let tls_port = free_port();
//! let node = TestNode::start("tls", NodeOptions {
//!     config: format!("listeners.ssl.local = 127.0.0.1:{tls_port}\n..."),
//!     ..NodeOptions::default()
//! }).await;
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::{free_port, T_LONG};

/// How to configure a [`TestNode`].
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// The text of the node's `rabbitmq.conf` (new-style `key = value`
    /// lines). The plain AMQP listener on 127.0.0.1 and
    /// [`TestNode::amqp_port`] is configured by the harness; add others here.
    pub config: String,
    /// Extra Erlang arguments for `RABBITMQ_SERVER_START_ARGS`, such as
    /// `-rabbit consumer_timeout 10000`.
    pub start_args: String,
    /// Plugins to enable, such as `rabbitmq_management` (which then listens
    /// on 127.0.0.1:[`TestNode::management_port`]).
    pub plugins: Vec<String>,
}

/// A RabbitMQ node started by a test; stopped and removed on drop.
#[derive(Debug)]
pub struct TestNode {
    node: String,
    amqp_port: u16,
    dist_port: u16,
    management_port: Option<u16>,
    dir: PathBuf,
    start_args: String,
}

impl TestNode {
    /// Starts the node `wt-<name>-<random>@localhost` and waits (at most
    /// [`T_LONG`]) until it has booted. Panics, with the end of the node's
    /// log, when it does not.
    pub async fn start(name: &str, options: NodeOptions) -> TestNode {
        TestNode::launch_booted(name, &options).await
    }

    /// Launches the node and waits until it has booted; a node that fails
    /// to boot (seen: its listener refused at once, now and then, on a busy
    /// machine) is removed and launched again, with new ports, twice at most.
    async fn launch_booted(name: &str, options: &NodeOptions) -> TestNode {
        let mut tries = 1;
        loop {
            let node = TestNode::launch(name, options);
            match node.booted(T_LONG).await {
                Ok(()) => return node,
                Err(e) if tries < 3 => {
                    eprintln!("node {} did not boot (try {tries}), again: {e}", node.node);
                    tries += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Writes the node's files and starts it, without waiting for it to
    /// boot (so several can boot at once).
    fn launch(name: &str, options: &NodeOptions) -> TestNode {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let short = format!("wt-{name}-{}", &suffix[..8]);
        let dir = std::env::temp_dir().join(&short);
        std::fs::create_dir_all(&dir).expect("create the node's directory");
        let with_management = options.plugins.iter().any(|p| p == "rabbitmq_management");
        let node = TestNode {
            node: format!("{short}@localhost"),
            amqp_port: free_port(),
            dist_port: free_port(),
            management_port: with_management.then(free_port),
            dir,
            start_args: options.start_args.clone(),
        };
        // From here on, dropping `node` stops whatever started and cleans up.
        node.write_files(options);
        node.boot();
        node
    }

    /// The full node name, `wt-…@localhost`, for `rabbitmqctl -n`.
    pub fn name(&self) -> &str {
        &self.node
    }

    /// The port of the plain AMQP listener (on 127.0.0.1).
    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// The Erlang distribution port (for clustering).
    pub fn dist_port(&self) -> u16 {
        self.dist_port
    }

    /// The management API's port, when `rabbitmq_management` is enabled.
    pub fn management_port(&self) -> Option<u16> {
        self.management_port
    }

    /// `amqp://guest:guest@127.0.0.1:<amqp_port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// The node's own directory (data, logs, configuration).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `rabbitmqctl -n <node> <args>` to the end (at most 60 s) and
    /// returns its output, successful or not.
    pub fn rabbitmqctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", &self.node, "-t", "60"];
        all.extend_from_slice(args);
        privileged("rabbitmqctl", &all)
            .stdin(Stdio::null())
            .output()
            .expect("run rabbitmqctl")
    }

    /// The whole of the node's log (empty when it cannot be read).
    pub fn log_text(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.node));
        std::fs::read_to_string(&log).unwrap_or_default()
    }

    /// The end of the node's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The operating system process id of the node's runtime, from its
    /// pid file (`None` before it was written).
    pub fn pid(&self) -> Option<u32> {
        let out = privileged("cat", &[&format!("{}/pid", self.dir_str())])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// Ends the node's runtime with SIGKILL, as a crash or power loss
    /// would, and waits (at most [`T_LONG`]) until its process is gone.
    /// Its files stay: [`TestNode::restart`] boots it again.
    pub async fn kill(&self) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("node {} has no pid file", self.node));
        let pid = pid.to_string();
        let _ = privileged("kill", &["-9", &pid]).status();
        let deadline = tokio::time::Instant::now() + T_LONG;
        while privileged("kill", &["-0", &pid])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} (pid {pid}) still runs {T_LONG:?} after SIGKILL",
                self.node
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Boots a node that was killed ([`TestNode::kill`]) or stopped again,
    /// with its data, and waits (at most [`T_LONG`]) until it has booted;
    /// a cluster member rejoins its cluster.
    pub async fn restart(&self) {
        self.boot();
        self.await_startup(T_LONG).await;
    }

    /// `rabbitmqctl stop_app`: the node's RabbitMQ application stops (its
    /// clients are disconnected, its queue replicas go offline) while its
    /// runtime stays up. Panics when the command fails.
    pub fn stop_app(&self) {
        self.ctl_ok(&["stop_app"]);
    }

    /// `rabbitmqctl start_app` after [`TestNode::stop_app`], then waits
    /// (at most [`T_LONG`]) until the node serves again.
    pub async fn start_app(&self) {
        self.ctl_ok(&["start_app"]);
        self.await_startup(T_LONG).await;
    }

    /// Runs `rabbitmqctl -n <node> <args>` and panics with its output when
    /// it fails; returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.rabbitmqctl(args);
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {}: {}{}",
            self.node,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn write_files(&self, options: &NodeOptions) {
        let config = format!(
            "listeners.tcp.local = 127.0.0.1:{}\n{}\n",
            self.amqp_port, options.config
        );
        std::fs::write(self.dir.join("rabbitmq.conf"), config).expect("write rabbitmq.conf");
        let plugins = format!("[{}].\n", options.plugins.join(","));
        std::fs::write(self.dir.join("enabled_plugins"), plugins).expect("write enabled_plugins");
        // The node runs as the rabbitmq user, which must own its data.
        let chown = privileged("chown", &["-R", "rabbitmq:rabbitmq", self.dir_str()])
            .status()
            .expect("run chown");
        assert!(chown.success(), "chown of {} failed", self.dir.display());
    }

    fn boot(&self) {
        let d = self.dir_str();
        let mut server_args = self.start_args.clone();
        if let Some(port) = self.management_port {
            server_args = format!(
                "-rabbitmq_management listener [{{port,{port}}},{{ip,\"127.0.0.1\"}}] {server_args}"
            );
        }
        let vars = [
            ("RABBITMQ_NODENAME", self.node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_owned()),
            ("RABBITMQ_NODE_PORT", self.amqp_port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE", format!("{d}/mnesia")),
            ("RABBITMQ_LOG_BASE", format!("{d}/log")),
            ("RABBITMQ_PID_FILE", format!("{d}/pid")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                format!("{d}/enabled_plugins"),
            ),
            ("RABBITMQ_CONFIG_FILE", format!("{d}/rabbitmq.conf")),
            (
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                format!("{d}/advanced.config"),
            ),
            ("RABBITMQ_SERVER_START_ARGS", server_args),
        ];
        // Through `env`, so that sudo (when not root) passes the variables
        // on; and through bash, which closes every inherited descriptor
        // above stderr first: a lock file held by a parent (scripts/test.sh)
        // would otherwise stay held by the node for its whole life.
        let mut args: Vec<String> = vec![
            "-c".into(),
            "for f in /proc/$$/fd/*; do n=${f##*/}; [ \"$n\" -gt 2 ] && eval \"exec $n>&-\"; \
             done 2>/dev/null; exec \"$@\""
                .into(),
            "close-fds".into(),
            "env".into(),
        ];
        args.extend(vars.iter().map(|(k, v)| format!("{k}={v}")));
        args.extend(["rabbitmq-server".into(), "-detached".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = privileged("bash", &refs)
            .stdin(Stdio::null())
            .output()
            .expect("run rabbitmq-server");
        assert!(
            out.status.success(),
            "rabbitmq-server -detached for {} failed: {}",
            self.node,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `await_startup` fails at once while the node is still booting: try
    /// again until it answers or `timeout` has passed.
    async fn await_startup(&self, timeout: Duration) {
        if let Err(e) = self.booted(timeout).await {
            panic!("{e}");
        }
    }

    /// Waits until the node has booted; what went wrong when it has not
    /// within `timeout`.
    async fn booted(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let out = self.rabbitmqctl(&["await_startup"]);
            if out.status.success() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "node {} did not start within {timeout:?}: {}\nnode log:\n{}",
                    self.node,
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn dir_str(&self) -> &str {
        self.dir.to_str().expect("UTF-8 temp dir")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let stopped = self.rabbitmqctl(&["stop"]).status.success();
        if !stopped {
            // Not answering (or never booted): end its process, if any.
            if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
                let _ = privileged("kill", &["-9", pid.trim()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = privileged("rm", &["-rf", self.dir_str()]).status();
    }
}

/// Nodes started together, the second and later joined to the first in
/// one RabbitMQ cluster; every node stopped and removed on drop.
///
/// ```ignore
/// let cluster = TestCluster::start("ha", 3, NodeOptions::default()).await;
/// let url = cluster.nodes()[1].amqp_url();
/// ```
#[derive(Debug)]
pub struct TestCluster {
    nodes: Vec<TestNode>,
}

impl TestCluster {
    /// Starts `n` nodes named `wt-<name><i>-<random>@localhost` (they boot
    /// at once), then joins each after the first to it (`stop_app`,
    /// `join_cluster`, `start_app`). Panics, with the failing command's
    /// output, when a step fails.
    pub async fn start(name: &str, n: usize, options: NodeOptions) -> TestCluster {
        assert!(n >= 1, "a cluster has at least one node");
        let mut cluster = TestCluster { nodes: Vec::new() };
        for i in 0..n {
            cluster
                .nodes
                .push(TestNode::launch(&format!("{name}{i}"), &options));
        }
        for i in 0..n {
            if let Err(e) = cluster.nodes[i].booted(T_LONG).await {
                eprintln!("node {i} of cluster {name} did not boot, again: {e}");
                // Stopped and removed on drop; a fresh one with new ports.
                cluster.nodes[i] = TestNode::launch_booted(&format!("{name}{i}"), &options).await;
            }
        }
        let first = cluster.nodes[0].name().to_owned();
        for node in &cluster.nodes[1..] {
            node.ctl_ok(&["stop_app"]);
            node.ctl_ok(&["join_cluster", &first]);
            node.ctl_ok(&["start_app"]);
        }
        cluster
    }

    /// The nodes, the first being the one the others joined.
    pub fn nodes(&self) -> &[TestNode] {
        &self.nodes
    }

    /// The names of the cluster's running nodes, as the first node sees them.
    pub fn running_nodes(&self) -> Vec<String> {
        let out = self.nodes[0].rabbitmqctl(&["cluster_status", "--formatter", "json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "cluster_status is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let mut running: Vec<String> = status["running_nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect();
        running.sort();
        running
    }
}

impl TestCluster {
    /// Every node's [`TestNode::amqp_url`], joined by commas: the form of a
    /// node list in `WARREN__BROKER__URL`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(TestNode::amqp_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node named `name` (`…@localhost`).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name() == name)
    }

    /// The rows of `rabbitmqctl <args> --formatter json`, asked of node
    /// `via` (which must be running). Panics when the answer is not JSON.
    pub fn json_rows(&self, via: usize, args: &[&str]) -> Vec<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--formatter", "json"]);
        let text = self.nodes[via].ctl_ok(&all);
        let value: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("rabbitmqctl {} is not JSON ({e}): {text}", args.join(" ")));
        value.as_array().cloned().unwrap_or_default()
    }

    /// The index of the node that leads the quorum queue `queue`, asked of
    /// node `via`; `None` while it has no leader (or is not quorum).
    pub fn queue_leader(&self, via: usize, queue: &str) -> Option<usize> {
        self.json_rows(via, &["list_queues", "name", "leader"])
            .iter()
            .find(|row| row["name"] == queue)
            .and_then(|row| row["leader"].as_str().and_then(|l| self.index_of(l)))
    }

    /// The indexes of the nodes holding a client connection whose
    /// properties mention `needle` (such as a Warren connection name,
    /// `warren worker <host>/<pid>`), asked of node `via`; sorted, each once.
    pub fn nodes_with_connection(&self, via: usize, needle: &str) -> Vec<usize> {
        let mut found: Vec<usize> = self
            .json_rows(via, &["list_connections", "port", "client_properties"])
            .iter()
            .filter(|row| row["client_properties"].to_string().contains(needle))
            .filter_map(|row| {
                let port = row["port"].as_u64()?;
                self.nodes
                    .iter()
                    .position(|n| u64::from(n.amqp_port()) == port)
            })
            .collect();
        found.sort_unstable();
        found.dedup();
        found
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // The joined nodes first, the first node last.
        while let Some(node) = self.nodes.pop() {
            drop(node);
        }
    }
}

/// `program args`, through `sudo -n` unless this process is root: the node
/// runs as the rabbitmq user, and starting it or removing its files needs
/// root (scripts/test.sh runs as root or with sudo).
fn privileged(program: &str, args: &[&str]) -> Command {
    let mut cmd = if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", program]);
        c
    };
    cmd.args(args);
    cmd
}

fn is_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.trim_ascii() == b"0")
            .unwrap_or(false)
    })
}
