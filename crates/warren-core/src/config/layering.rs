//! Loading: the built-in defaults, a file and the environment, merged.

use std::path::Path;

use super::{Config, ConfigError};

/// The built-in configuration, the lowest layer of every load.
pub(super) const DEFAULT_TOML: &str = include_str!("../../../../config/default.toml");

/// Prefix of environment variables that set configuration keys.
const ENV_PREFIX: &str = "WARREN__";

/// Configuration keys whose environment value is a comma-separated list.
const ENV_LIST_KEYS: &[&str] = &[
    "worker.queues",
    "http.allow",
    "http.deny",
    "tracker.tokens",
    "tracker.users",
];

/// Origin the config crate reports for values set from the environment.
const ENV_ORIGIN: &str = "the environment";

impl Config {
    /// Loads the built-in defaults (`config/default.toml`, compiled in),
    /// then the file if given, then `WARREN__SECTION__KEY` variables from the
    /// process environment (`WARREN__WORKER__QUEUES` is a comma list), and
    /// validates the result. Every `WARREN__` variable must name a key.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| is_warren_var(k))
            .collect();
        Self::load_from(path, &env)
    }

    /// Like [`Config::load`] but with an explicit environment instead of the
    /// process's; variables without the `WARREN__` prefix are ignored.
    pub fn load_from(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some(UserFile {
                    text,
                    label: format!("config file {}", path.display()),
                })
            }
            None => None,
        };
        Self::layered(file, env)
    }

    /// Lays a complete TOML document over the built-in defaults and
    /// validates the result; no environment is read.
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        let file = UserFile {
            text: toml.to_string(),
            label: "config TOML".into(),
        };
        Self::layered(Some(file), &[])
    }

    fn layered(file: Option<UserFile>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let file_label = file.as_ref().map(|f| f.label.clone());
        let convert = |e| parse_error(e, file_label.as_deref(), env);

        let mut config: Config = layers(true, file.as_ref(), env)?
            .build()
            .map_err(convert)?
            .try_deserialize()
            .map_err(convert)?;
        // The file and the environment alone, to tell which keys they set.
        let user = layers(false, file.as_ref(), env)?
            .build()
            .map_err(convert)?;
        config.settle_reconnect_max_ms(|key| {
            user.get::<config::Value>(key)
                .is_ok()
                .then(|| key_source(key, file_label.as_deref(), env))
        });
        config.validate()?;
        Ok(config)
    }
}

/// The layers of a load, the built-in defaults first if `defaults`, then
/// the file, then the environment.
fn layers(
    defaults: bool,
    file: Option<&UserFile>,
    env: &[(String, String)],
) -> Result<config::builder::ConfigBuilder<config::builder::DefaultState>, ConfigError> {
    use config::{File, FileFormat};

    let mut builder = config::Config::builder();
    if defaults {
        builder = builder.add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
    }
    if let Some(file) = file {
        builder = builder.add_source(File::from_str(&file.text, FileFormat::Toml));
    }
    let origin = ENV_ORIGIN.to_string();
    for (var, value) in env {
        let Some(key) = env_key(var) else { continue };
        let kind = if key == "broker.url" {
            // One URI, or several separated by commas (one per node).
            let mut urls = super::broker::split_env_urls(value);
            if urls.len() == 1 {
                config::ValueKind::String(urls.remove(0))
            } else {
                let items = urls
                    .into_iter()
                    .map(|u| config::Value::new(Some(&origin), u))
                    .collect();
                config::ValueKind::Array(items)
            }
        } else if ENV_LIST_KEYS.contains(&key.as_str()) {
            let items = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| config::Value::new(Some(&origin), s))
                .collect::<Vec<_>>();
            config::ValueKind::Array(items)
        } else {
            config::ValueKind::String(value.clone())
        };
        builder = builder
            .set_override(key.as_str(), config::Value::new(Some(&origin), kind))
            .map_err(|_| {
                ConfigError::Parse(format!(
                    "environment variable {var}: does not name a config key; \
                     use WARREN__SECTION__KEY, for example WARREN__WORKER__CONCURRENCY"
                ))
            })?;
    }
    Ok(builder)
}

/// Where a key the file or the environment sets was set, for messages:
/// `" (set by WARREN__...)"` when the environment sets it (the top layer),
/// else `" (in <file>)"`.
fn key_source(key: &str, file: Option<&str>, env: &[(String, String)]) -> String {
    env.iter()
        .find(|(var, _)| env_key(var).as_deref() == Some(key))
        .map(|(var, _)| format!(" (set by {var})"))
        .or_else(|| file.map(|f| format!(" (in {f})")))
        .unwrap_or_default()
}

/// A configuration document above the defaults, and how to name it in errors.
struct UserFile {
    text: String,
    label: String,
}

fn is_warren_var(var: &str) -> bool {
    var.len() > ENV_PREFIX.len()
        && var.is_char_boundary(ENV_PREFIX.len())
        && var[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX)
}

/// `WARREN__WORKER__CONCURRENCY` -> `worker.concurrency`.
fn env_key(var: &str) -> Option<String> {
    is_warren_var(var).then(|| var[ENV_PREFIX.len()..].to_lowercase().replace("__", "."))
}

/// Turns a config-crate error into a one-line message naming the key and,
/// when known, where the value came from.
fn parse_error(
    e: config::ConfigError,
    file: Option<&str>,
    env: &[(String, String)],
) -> ConfigError {
    use config::ConfigError as E;

    let (key, mut problem, origin) = match e {
        E::Type {
            origin,
            unexpected,
            expected,
            key,
        } => (
            key,
            format!("invalid type: {unexpected}, expected {expected}"),
            origin,
        ),
        E::At { error, origin, key } => (key, error.to_string(), origin),
        E::Message(m) => (None, m, None),
        E::FileParse { cause, .. } => {
            let what = file.unwrap_or("built-in config/default.toml");
            return ConfigError::Parse(format!("cannot parse {what}: {cause}"));
        }
        other => (None, other.to_string(), None),
    };

    // The config crate writes `queues[0]name`; TOML paths say `queues[0].name`.
    let mut key = key.map(|k| {
        k.replace("]", "].")
            .replace("].[", "][")
            .trim_end_matches('.')
            .to_string()
    });
    // serde reports an unknown key at its parent; name the key itself.
    if let Some(rest) = problem.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            key = Some(match key {
                Some(parent) => format!("{parent}.{field}"),
                None => field.to_string(),
            });
            let expected = expected.trim_start_matches(", ");
            problem = format!("unknown key (check the spelling); {expected}");
        }
    }

    // The environment is the top layer: if it sets the key, the value came from there.
    let from_env = key.as_deref().and_then(|k| {
        env.iter()
            .find(|(var, _)| env_key(var).as_deref() == Some(k))
            .map(|(var, _)| format!(" (set by {var})"))
    });
    let source = from_env
        .or_else(|| match origin.as_deref() {
            Some(ENV_ORIGIN) => None,
            Some(other) => Some(format!(" (in {other})")),
            None => file.map(|f| format!(" (in {f})")),
        })
        .unwrap_or_default();

    ConfigError::Parse(match key {
        Some(key) => format!("config key {key}: {problem}{source}"),
        None => format!("{problem}{source}"),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::test_support::{env, parse_error};
    use super::super::*;

    #[test]
    fn built_in_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.prefix, "warren");
        assert_eq!(c.broker, BrokerConfig::default());
        assert_eq!(c.worker, WorkerConfig::default());
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.scheduler, SchedulerConfig::default());
        assert_eq!(c.retry.default, RetryPolicy::default());
        let names: Vec<&str> = c.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["io", "cpu", "diag"]);
        assert!(c
            .queues
            .iter()
            .all(|q| c.queue_kind(q) == QueueKind::Classic));
        assert!(c.queues.iter().all(|q| q.max_priority == 10));
        assert!(c.default_queue().is_none());
        assert_eq!(c.worker_queues().len(), 3);
        assert_eq!(c.names().tasks(), "warren.tasks");
    }

    #[test]
    fn arrays_replace_scalars_layer() {
        let c = Config::from_toml(
            "prefix = \"acme\"\n[worker]\nconcurrency = 2\n\
             [[queues]]\nname = \"only\"\n\
             [[routes]]\npattern = \"#\"\nqueue = \"only\"\n",
        )
        .unwrap();
        assert_eq!(c.prefix, "acme");
        assert_eq!(c.worker.concurrency, 2);
        assert_eq!(c.worker.prefetch, 256);
        assert_eq!(c.queues.len(), 1);
        assert_eq!(c.queues[0].max_priority, 10);
        assert_eq!(c.queue_kind(&c.queues[0]), QueueKind::Classic);
        assert_eq!(c.routes.len(), 1);
    }

    #[test]
    fn environment_layers_over_file() {
        let dir = std::env::temp_dir().join(format!("warren-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.toml");
        std::fs::write(&path, "prefix = \"file\"\n[worker]\nconcurrency = 3\n").unwrap();
        let c = Config::load_from(
            Some(&path),
            &env(&[
                ("WARREN__PREFIX", "envp"),
                ("WARREN__BROKER__URL", "amqps://u:secret@h:5671/v"),
                ("WARREN__WORKER__PREFETCH", "32"),
                ("WARREN__WORKER__QUEUES", "io, diag"),
                ("WARREN_LOG", "debug"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c.prefix, "envp");
        assert_eq!(c.worker.concurrency, 3);
        assert_eq!(c.worker.prefetch, 32);
        assert_eq!(c.broker.url.expose(), "amqps://u:secret@h:5671/v");
        let qs: Vec<&str> = c.worker_queues().iter().map(|q| q.name.as_str()).collect();
        assert_eq!(qs, ["io", "diag"]);

        let c = Config::load_from(None, &env(&[("WARREN__WORKER__QUEUES", "")])).unwrap();
        assert!(c.worker.queues.is_empty());
    }

    #[test]
    fn environment_type_error_names_key_and_variable() {
        let err = Config::load_from(None, &env(&[("WARREN__WORKER__CONCURRENCY", "abc")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "config key worker.concurrency: invalid type: string \"abc\", expected an integer \
             (set by WARREN__WORKER__CONCURRENCY)"
        );
    }

    #[test]
    fn unknown_environment_key_is_an_error() {
        let err = Config::load_from(None, &env(&[("WARREN__WORKER__CONCURENCY", "4")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config key worker.concurency: unknown key (check the spelling)"),
            "{err}"
        );
        assert!(
            err.ends_with(" (set by WARREN__WORKER__CONCURENCY)"),
            "{err}"
        );
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let err = parse_error("[worker]\nconcurency = 4\n");
        assert!(
            err.starts_with(
                "config key worker.concurency: unknown key (check the spelling); expected one of"
            ),
            "{err}"
        );
        assert!(err.contains("`concurrency`"), "{err}");
        let err = parse_error("prefx = \"a\"\n");
        assert!(err.starts_with("config key prefx: unknown key"), "{err}");
        let err = parse_error("[[queues]]\nname = \"a\"\nmax_prio = 3\n");
        assert!(
            err.starts_with("config key queues[0].max_prio: unknown key"),
            "{err}"
        );
        let err = parse_error("[retry.types.\"a.b\"]\nretries = 3\n");
        assert!(
            err.starts_with("config key retry.types.a.b.retries: unknown key"),
            "{err}"
        );
    }

    #[test]
    fn type_errors_name_the_key() {
        let err = parse_error("[worker]\nconcurrency = \"abc\"\n");
        assert_eq!(
            err,
            "config key worker.concurrency: invalid type: string \"abc\", expected an integer \
             (in config TOML)"
        );
        let err = parse_error("[[queues]]\nname = \"a\"\ntype = \"quorom\"\n");
        assert_eq!(
            err,
            "config key queues[0].type: \"quorom\" is not a queue type: use \"classic\" or \
             \"quorum\" (in config TOML)"
        );
        let err = parse_error("[[queues]]\nname = \"a\"\nmax_priority = 300\n");
        assert!(
            err.starts_with(
                "config key queues[0].max_priority: 300 is out of range: must be 1..=255"
            ),
            "{err}"
        );
    }

    #[test]
    fn toml_syntax_error_and_missing_file() {
        let err = parse_error("[worker\n");
        assert!(err.starts_with("cannot parse config TOML: "), "{err}");
        let err = Config::load_from(Some(Path::new("/nonexistent/warren.toml")), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err
            .to_string()
            .starts_with("cannot read config file /nonexistent/warren.toml: "));
    }

    #[test]
    fn shipped_config_files_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let mut loaded = 0;
        for dir in [root.clone(), root.join("examples")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    Config::load_from(Some(&path), &[])
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    loaded += 1;
                }
            }
        }
        assert!(loaded >= 3, "only {loaded} files found");

        let with_default =
            Config::load_from(Some(&root.join("examples/with-default-queue.toml")), &[]).unwrap();
        assert_eq!(with_default.default_queue().unwrap().name, "default");
        let exec = Config::load_from(Some(&root.join("examples/exec.toml")), &[]).unwrap();
        assert_eq!(
            exec.exec_of("report.build").unwrap().command,
            ["python3", "examples/exec/report.py"]
        );
        let webhook = Config::load_from(Some(&root.join("examples/webhook.toml")), &[]).unwrap();
        assert_eq!(
            webhook
                .webhook_of("report.sum")
                .unwrap()
                .secret_env
                .as_deref(),
            Some("WARREN_WEBHOOK_SECRET")
        );
        let quorum = Config::load_from(Some(&root.join("examples/quorum.toml")), &[]).unwrap();
        assert_eq!(
            quorum.queue_kind(quorum.queue("io").unwrap()),
            QueueKind::Quorum
        );
        assert_eq!(
            quorum
                .queue_bands(quorum.queue("io").unwrap())
                .map(|b| b.lanes()),
            Some(3)
        );
    }
}
