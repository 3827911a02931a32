//! TLS to the broker: `amqps://` against a node of its own with a TLS
//! listener that requires client certificates, with a CA and certificates
//! made by the test (the `openssl` command). A task runs end to end over
//! TLS; a wrong CA, a host the certificate does not name and a missing
//! client certificate each stop `warren` with one line naming the setting.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use warren_client::{Client, TaskRequest};
use warren_e2e::{free_port, states, until_final, CommandExt, Env, NodeOptions, TestNode, T};

/// A throwaway PKI in a temp dir: a CA, a server certificate for
/// `localhost` only, a client certificate, and an unrelated second CA.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("warren-tls-{}", &suffix[..8]));
        std::fs::create_dir_all(&dir).expect("create the PKI dir");
        let pki = Pki { dir };
        pki.ca("ca", "Warren test CA");
        pki.ca("other-ca", "Unrelated CA");
        pki.leaf(
            "server",
            "localhost",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
        );
        pki.leaf("client", "warren-client", "extendedKeyUsage=clientAuth\n");
        // The node runs as the rabbitmq user: it must read these files.
        for entry in std::fs::read_dir(&pki.dir).expect("list the PKI dir") {
            let path = entry.expect("PKI file").path();
            set_mode(&path, 0o644);
        }
        set_mode(&pki.dir, 0o755);
        pki
    }

    /// The path of `name` in the PKI dir, as a string for settings.
    fn path(&self, name: &str) -> String {
        self.dir
            .join(name)
            .to_str()
            .expect("UTF-8 temp dir")
            .to_owned()
    }

    fn ca(&self, name: &str, cn: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// A certificate issued by `ca` with the extensions `ext`.
    fn leaf(&self, name: &str, cn: &str, ext: &str) {
        let ext_file = format!("{name}.ext");
        std::fs::write(
            self.dir.join(&ext_file),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n{ext}"),
        )
        .expect("write extensions");
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext_file,
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .succeeds();
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The one error line `warren` printed on stderr. Any other line must be
/// a log line of the AMQP library: a TLS 1.3 broker refuses a missing
/// client certificate only after the handshake, and the library logs that
/// I/O error from its own thread, as it does a refused login. No panic, no
/// backtrace.
#[track_caller]
fn error_line(stderr: &str) -> &str {
    let (errors, others): (Vec<&str>, Vec<&str>) = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .partition(|l| l.starts_with("error: "));
    assert_eq!(errors.len(), 1, "expected one error line:\n{stderr}");
    for line in others {
        assert!(
            line.contains("lapin::"),
            "a line other than the error: {line}\n{stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    errors[0]
}

#[tokio::test]
async fn amqps_runs_tasks_and_each_wrong_setting_fails_in_one_line_naming_it() {
    let started = std::time::Instant::now();
    let pki = Pki::new();
    let tls_port = free_port();
    let node = TestNode::start(
        "tls",
        NodeOptions {
            config: format!(
                "listeners.ssl.local = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n",
                pki.path("ca.pem"),
                pki.path("server.pem"),
                pki.path("server.key"),
            ),
            ..NodeOptions::default()
        },
    )
    .await;
    let url = format!("amqps://guest:guest@localhost:{tls_port}/%2f");
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );

    // 1. The right CA and a client certificate: the client (topology apply
    // and the producer of Env::new) and `warren up` all talk TLS.
    let mut env = Env::new(
        "tls",
        &[
            ("WARREN__BROKER__URL", &url),
            ("WARREN__BROKER__TLS_CA_FILE", &ca),
            ("WARREN__BROKER__TLS_CLIENT_CERT", &cert),
            ("WARREN__BROKER__TLS_CLIENT_KEY", &key),
        ],
    )
    .await;
    let mut watch = env.watch(&["#"]).await;
    env.up(&[]);
    let id = env
        .publish(&TaskRequest::new("diag.echo", json!({"over": "tls"})))
        .await;
    let got = until_final(&mut watch, &[&id], T).await;
    assert_eq!(states(&got[&id]), ["started", "succeeded"]);
    assert_eq!(got[&id][1].event.result, Some(json!({"over": "tls"})));
    // The node has no other clients: every connection it lists is Warren's,
    // and every one of them is TLS (the worker's among them).
    let listed = node.rabbitmqctl(&[
        "list_connections",
        "--no-table-headers",
        "ssl",
        "client_properties",
    ]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(listed.contains("warren worker"), "{listed}");
    assert!(!listed.lines().any(|l| l.starts_with("false")), "{listed}");

    // The failures, each with `warren topology apply`, which connects as
    // every command does. `base` is the right configuration.
    let base = [
        ("WARREN__BROKER__URL", url.as_str()),
        ("WARREN__BROKER__TLS_CA_FILE", ca.as_str()),
        ("WARREN__BROKER__TLS_CLIENT_CERT", cert.as_str()),
        ("WARREN__BROKER__TLS_CLIENT_KEY", key.as_str()),
    ];
    let fails = |env: &Env, change: &[(&str, Option<&str>)]| -> String {
        let mut cmd = env.warren(&["topology", "apply"]);
        cmd.envs(base);
        for (k, v) in change {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.fails()
    };

    // 2. A CA that did not issue the broker's certificate: the handshake
    // fails, and the error is all `warren` prints.
    let other_ca = pki.path("other-ca.pem");
    let stderr = fails(&env, &[("WARREN__BROKER__TLS_CA_FILE", Some(&other_ca))]);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let line = error_line(&stderr);
    assert!(
        line.starts_with(&format!("error: broker.tls_ca_file = \"{other_ca}\": ")),
        "{line}"
    );
    assert!(line.contains("UnknownIssuer"), "{line}");
    // A worker, which would otherwise wait for the broker in its reconnect
    // loop, stops too.
    let worker = env.spawn(&["worker"], &[("WARREN__BROKER__TLS_CA_FILE", &other_ca)]);
    let code = env.wait_exit(&worker, T).await;
    let log = env.log_of(&worker);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        error_line(&log).starts_with(&format!("error: broker.tls_ca_file = \"{other_ca}\": ")),
        "{log}"
    );
    // The library says the same to an embedding program.
    let mut config = env.config.clone();
    config.broker.tls_ca_file = other_ca.clone();
    let err = Client::connect(&config)
        .await
        .expect_err("wrong CA refused");
    assert!(err.is_setting_problem(), "{err}");
    assert!(
        err.to_string().starts_with("broker.tls_ca_file = "),
        "{err}"
    );

    // 3. A host the certificate does not name (it has DNS:localhost only).
    let by_ip = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    let stderr = fails(&env, &[("WARREN__BROKER__URL", Some(&by_ip))]);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let line = error_line(&stderr);
    assert!(line.starts_with("error: broker.url: "), "{line}");
    assert!(
        line.contains("not valid for its host \"127.0.0.1\""),
        "{line}"
    );
    assert!(!line.contains("guest:guest"), "password shown: {line}");

    // 4. No client certificate, which the broker requires.
    let stderr = fails(
        &env,
        &[
            ("WARREN__BROKER__TLS_CLIENT_CERT", None),
            ("WARREN__BROKER__TLS_CLIENT_KEY", None),
        ],
    );
    let line = error_line(&stderr);
    assert!(
        line.starts_with("error: broker.tls_client_cert: not set, and the broker at "),
        "{line}"
    );
    assert!(line.contains("requires a client certificate"), "{line}");

    // A missing file is a configuration error before any connection.
    let stderr = fails(
        &env,
        &[("WARREN__BROKER__TLS_CA_FILE", Some("/nonexistent/ca.pem"))],
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let line = error_line(&stderr);
    assert!(
        line.contains("config key broker.tls_ca_file: \"/nonexistent/ca.pem\" cannot be read"),
        "{line}"
    );

    drop(watch);
    drop(env);
    drop(node);
    eprintln!("tls e2e took {:?}", started.elapsed());
}
