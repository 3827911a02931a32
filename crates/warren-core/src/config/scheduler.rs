//! `[scheduler]` and `[[cron]]`: delays, poison detection, cancellation,
//! and the cron schedules.

use std::collections::BTreeMap;

use croner::errors::CronError;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Deserializer};

use super::issues::check_listen;
use super::{is_short_name, Config, Issues, MAX_PREFIX_CHARS};
use crate::routes;

/// Longest cron schedule name: it appears in task ids and internal queue
/// names, which must stay readable.
const MAX_CRON_NAME_CHARS: usize = 64;

/// Highest AMQP priority a task may carry (contract: 0..9).
const MAX_TASK_PRIORITY: u8 = 9;

/// Settings of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Longest delay a delayed task may ask for (further: dead `invalid`).
    pub max_delay_ms: u64,
    /// Redeliveries without an outcome tolerated before a task is poison.
    pub poison_redeliveries: u32,
    /// How long a cancel request is remembered.
    pub cancel_ttl_ms: u64,
    /// Address of the scheduler's `/metrics`, `/healthz` and `/readyz`
    /// (`host:port`); empty turns them off.
    pub listen: String,
    /// Whether `warren scheduler` declares the topology when it starts
    /// (true), or only checks that it exists (false: a least-privilege
    /// scheduler user, the topology applied by the operator).
    pub declare_topology: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_delay_ms: 315_576_000_000,
            poison_redeliveries: 5,
            cancel_ttl_ms: 86_400_000,
            listen: "127.0.0.1:8091".into(),
            declare_topology: true,
        }
    }
}

/// One cron schedule: a task published at each fire time by the one
/// scheduler replica that holds the cron lock.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CronConfig {
    /// Short name (`nightly-report`): lowercase letters, digits, `_` and
    /// `-`; unique. Part of every fired task's id, `cron:<name>:<time>`.
    #[serde(default)]
    pub name: String,
    /// Cron expression with seconds, six fields:
    /// `sec min hour day-of-month month day-of-week` (`"0 */5 * * * *"`).
    #[serde(default)]
    pub schedule: String,
    /// IANA time zone the schedule is read in (`"Europe/Paris"`); `"UTC"` by
    /// default. The scheduler resolves it against its time zone database.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Task type published at each fire time; a route or the default queue
    /// must take it.
    #[serde(default)]
    pub task_type: String,
    /// The task's arguments (any TOML value, sent as JSON); `{}` by default.
    #[serde(default = "default_cron_args")]
    pub args: serde_json::Value,
    /// AMQP priority of the published tasks, 0..=9; none by default.
    #[serde(default, deserialize_with = "deserialize_task_priority")]
    pub priority: Option<u8>,
    /// What to do with fire times missed while no scheduler ran.
    #[serde(default)]
    pub missed: MissedFires,
}

fn default_timezone() -> String {
    "UTC".into()
}

fn default_cron_args() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// Reads an optional task priority as any integer so an out-of-range value
/// gets a message that says the range; [`Config::validate`] checks 0..=9.
fn deserialize_task_priority<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    let Some(value) = Option::<i64>::deserialize(d)? else {
        return Ok(None);
    };
    u8::try_from(value).map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{value} is out of range: must be 0..=9 (task priorities)"
        ))
    })
}

/// What a schedule does with fire times that passed while no scheduler ran,
/// written `"skip"` or `"run_once"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissedFires {
    /// Publish nothing for them; the next fire time is the next one to come.
    #[default]
    Skip,
    /// Publish one task, for the latest missed fire time.
    RunOnce,
}

impl<'de> Deserialize<'de> for MissedFires {
    /// Read by hand so an unknown word gets a message that lists the choices.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let word = String::deserialize(d)?;
        match word.as_str() {
            "skip" => Ok(Self::Skip),
            "run_once" => Ok(Self::RunOnce),
            _ => Err(serde::de::Error::custom(format!(
                "{word:?} is not a missed-fire policy: use \"skip\" or \"run_once\""
            ))),
        }
    }
}

impl MissedFires {
    /// The value as written in the configuration (`skip`, `run_once`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::RunOnce => "run_once",
        }
    }
}

impl Config {
    pub(super) fn check_scheduler(&self, issues: &mut Issues) {
        check_listen(
            issues,
            "scheduler.listen",
            &self.scheduler.listen,
            "8091",
            true,
        );
        let s = &self.scheduler;
        issues.above_zero(
            "scheduler.max_delay_ms",
            s.max_delay_ms,
            "0 would reject every delayed task: set it above 0, for example 315576000000 \
             (10 years)",
        );
        issues.above_zero(
            "scheduler.poison_redeliveries",
            s.poison_redeliveries,
            "0 would park a task after a single worker crash: set it to at least 1, \
             for example 5",
        );
        issues.above_zero(
            "scheduler.cancel_ttl_ms",
            s.cancel_ttl_ms,
            "0 would forget cancel requests at once: set it above 0, for example \
             86400000 (24 hours)",
        );
    }

    pub(super) fn check_cron(&self, issues: &mut Issues) {
        let mut first_with_name: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, c) in self.cron.iter().enumerate() {
            let key = |field: &str| format!("cron[{i}].{field}");
            if c.name.is_empty() {
                issues.add(
                    key("name"),
                    "is missing or empty: name the schedule with lowercase letters, digits, \
                     '_' or '-'",
                );
            } else if !is_short_name(&c.name) {
                issues.add(
                    key("name"),
                    format!(
                        "{:?} is not a valid schedule name: use lowercase letters, digits, '_' \
                         and '-' only",
                        c.name
                    ),
                );
            } else if c.name.len() > MAX_CRON_NAME_CHARS {
                issues.add(
                    key("name"),
                    format!(
                        "{:?} is {} characters long: use at most {MAX_CRON_NAME_CHARS}",
                        c.name,
                        c.name.len()
                    ),
                );
            } else if let Some(&first) = first_with_name.get(c.name.as_str()) {
                issues.add(
                    key("name"),
                    format!(
                        "{:?} is also the name of cron[{first}]: schedule names must be \
                         unique; rename or remove one",
                        c.name
                    ),
                );
            } else {
                first_with_name.insert(&c.name, i);
            }

            if c.schedule.trim().is_empty() {
                issues.add(
                    key("schedule"),
                    "is missing or empty: set a cron expression with seconds, such as \
                     \"0 */5 * * * *\" (every 5 minutes)",
                );
            } else if let Err(why) = parse_cron(&c.schedule) {
                issues.add(key("schedule"), format!("{:?} {why}", c.schedule));
            }

            if !is_time_zone_name(&c.timezone) {
                issues.add(
                    key("timezone"),
                    format!(
                        "{:?} is not an IANA time zone name: use one such as \"UTC\" (the \
                         default), \"Europe/Paris\" or \"America/New_York\"",
                        c.timezone
                    ),
                );
            }

            if c.task_type.is_empty() {
                issues.add(
                    key("task_type"),
                    "is missing or empty: set the task type each fire publishes, such as \
                     \"diag.echo\"",
                );
            } else if !routes::is_valid_task_type(&c.task_type) {
                issues.add(
                    key("task_type"),
                    format!(
                        "{:?} is not a task type: use words of letters, digits, '_' or '-' \
                         joined by '.', without '*' or '#'",
                        c.task_type
                    ),
                );
            } else if self.default_queue().is_none()
                && !self
                    .routes
                    .iter()
                    .any(|r| routes::matches(&r.pattern, &c.task_type))
            {
                issues.add(
                    key("task_type"),
                    format!(
                        "{:?} matches no [[routes]] pattern and no queue is default = true, so \
                         every fired task would be parked in {}: add a [[routes]] entry for it \
                         or mark a queue default = true",
                        c.task_type,
                        self.names().unroutable()
                    ),
                );
            }

            if let Some(p) = c.priority.filter(|&p| p > MAX_TASK_PRIORITY) {
                issues.add(
                    key("priority"),
                    format!(
                        "{p} is out of range: must be 0..={MAX_TASK_PRIORITY} (task \
                         priorities); lower it or leave it out"
                    ),
                );
            }
        }
    }
}

/// Whether `tz` is shaped like an IANA time zone name (`UTC`, `Europe/Paris`,
/// `Etc/GMT+3`). Whether the database knows it is checked by the scheduler,
/// which carries the database.
fn is_time_zone_name(tz: &str) -> bool {
    tz.len() <= MAX_PREFIX_CHARS
        && tz.starts_with(|c: char| c.is_ascii_alphabetic())
        && tz.split('/').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+'))
        })
}

/// Parses a cron expression exactly as the scheduler runs it: six fields,
/// `second minute hour day-of-month month day-of-week`, read by the `croner`
/// crate with the seconds field required and no year field (the day fields
/// match when either does, as in Vixie cron). Configuration validation and
/// the scheduler both call this, so an expression that validates is one the
/// scheduler accepts, and the reverse.
///
/// The error continues a sentence that starts with the quoted expression,
/// naming the field and, where it can, the item and what is wrong with it.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    let cron = cron_parser()
        .parse(expr)
        .map_err(|e| explain_cron_error(expr, &e))?;
    // croner reads a field of commas alone as a list of no values: nothing
    // matches, and the search for a fire time then runs for minutes.
    let empty = CRON_FIELDS
        .iter()
        .zip(expr.split_whitespace())
        .find(|(_, text)| text.split(',').all(str::is_empty));
    if let Some((field, text)) = empty {
        return Err(format!(
            "is not a valid cron expression: {} field {text:?} lists no value: write at \
             least one, or \"*\" for every {}",
            field.name, field.name
        ));
    }
    Ok(cron)
}

fn cron_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Disallowed)
        .build()
}

/// One field of a cron expression, for messages: its name, its range and the
/// names its values may be written with (the first stands for `first_named`).
struct CronField {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    first_named: u32,
}

const MONTH_NAMES: &[&str] = &[
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAY_NAMES: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
const DAY_OF_MONTH: usize = 3;
const DAY_OF_WEEK: usize = 5;

/// The six fields of Warren's cron expressions, seconds first. Day of week
/// 0 and 7 are both Sunday.
const CRON_FIELDS: [CronField; 6] = [
    CronField {
        name: "second",
        min: 0,
        max: 59,
        names: &[],
        first_named: 0,
    },
    CronField {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
        first_named: 0,
    },
    CronField {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
        first_named: 0,
    },
    CronField {
        name: "day-of-month",
        min: 1,
        max: 31,
        names: &[],
        first_named: 0,
    },
    CronField {
        name: "month",
        min: 1,
        max: 12,
        names: MONTH_NAMES,
        first_named: 1,
    },
    CronField {
        name: "day-of-week",
        min: 0,
        max: 7,
        names: WEEKDAY_NAMES,
        first_named: 0,
    },
];

/// Why `croner` rejected `expr`, in Warren's words. The parser decides; this
/// only finds the culprit, by parsing the first field that fails alone (every
/// other field `*`), then each of its list items alone, and says what is wrong
/// with that item; what it cannot explain is told in croner's own words.
fn explain_cron_error(expr: &str, error: &CronError) -> String {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() == 5 {
        return format!(
            "has 5 fields, but schedules start with a seconds field: use 6, for example \
             \"0 {}\" to fire at second 0",
            fields.join(" ")
        );
    }
    if fields.len() != CRON_FIELDS.len() {
        return format!(
            "has {} fields: use 6, \"second minute hour day-of-month month day-of-week\", \
             for example \"0 */5 * * * *\" (every 5 minutes)",
            fields.len()
        );
    }
    let parser = cron_parser();
    let alone = |index: usize, text: &str| {
        let mut probe = ["*"; 6];
        probe[index] = text;
        parser.parse(&probe.join(" "))
    };
    for (index, (field, &text)) in CRON_FIELDS.iter().zip(&fields).enumerate() {
        let Err(field_error) = alone(index, text) else {
            continue;
        };
        let items: Vec<&str> = text.split(',').collect();
        let why = items
            .iter()
            .find_map(|item| {
                let item_error = alone(index, item).err()?;
                Some(
                    explain_cron_item(field, index, item).unwrap_or_else(|| item_error.to_string()),
                )
            })
            .unwrap_or_else(|| {
                if items.len() > 1 && items.contains(&"*") {
                    "\"*\" cannot be one item of a list: write \"*\" alone".into()
                } else {
                    field_error.to_string()
                }
            });
        return format!(
            "is not a valid cron expression: {} field {text:?}: {why}",
            field.name
        );
    }
    format!("is not a valid cron expression: {error}")
}

/// What is wrong with one list item of a field, which the parser rejected;
/// `None` when nothing more precise than the parser's own words can be said.
fn explain_cron_item(field: &CronField, index: usize, item: &str) -> Option<String> {
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => (range, Some(step)),
        None => (item, None),
    };
    if let Some(step) = step {
        if !step.parse::<u16>().is_ok_and(|n| n >= 1) {
            return Some(format!(
                "the step {step:?} of {item:?} must be a whole number of at least 1"
            ));
        }
        if range != "*" && range != "?" && !range.contains('-') {
            return Some(format!(
                "{item:?} steps from a single value: write \"*/{step}\", or a range such as \
                 \"{range}-{}/{step}\"",
                field.max
            ));
        }
    }
    if range == "?" && index != DAY_OF_MONTH && index != DAY_OF_WEEK {
        return Some("\"?\" is allowed only in the day-of-month and day-of-week fields".into());
    }
    if step.is_none() && index == DAY_OF_MONTH {
        if let Some(day) = range.strip_suffix(['W', 'w']) {
            return cron_value(field, day).err();
        }
    }
    if step.is_none() && index == DAY_OF_WEEK {
        if let Some((day, nth)) = range.split_once('#') {
            if let Err(why) = cron_value(field, day) {
                return Some(why);
            }
            return (!nth.eq_ignore_ascii_case("L") && !matches!(nth, "1" | "2" | "3" | "4" | "5"))
                .then(|| {
                    format!("the occurrence {nth:?} of {item:?} must be 1..=5 or L (the last)")
                });
        }
        if let Some(day) = range.strip_suffix(['L', 'l']) {
            return cron_value(field, day).err();
        }
    }
    let (low, high) = match range.split_once('-') {
        Some((a, b)) => {
            let high = match cron_value(field, b) {
                // `FRI-SUN` ends on the Sunday written 7.
                Ok(0) if index == DAY_OF_WEEK && !b.starts_with(|c: char| c.is_ascii_digit()) => 7,
                Ok(n) => n,
                Err(why) => return Some(why),
            };
            match cron_value(field, a) {
                Ok(low) => (low, high),
                Err(why) => return Some(why),
            }
        }
        None if range == "*" => return None,
        None => match cron_value(field, range) {
            Ok(v) => (v, v),
            Err(why) => return Some(why),
        },
    };
    (low > high).then(|| format!("the range {range:?} runs backwards: write it from low to high"))
}

/// One value of a cron field, as a number in range or a name.
fn cron_value(field: &CronField, text: &str) -> Result<u32, String> {
    if let Ok(n) = text.parse::<u32>() {
        return if (field.min..=field.max).contains(&n) {
            Ok(n)
        } else {
            Err(format!(
                "{n} is out of range: a {} is {}..={}",
                field.name, field.min, field.max
            ))
        };
    }
    if let Some(i) = field
        .names
        .iter()
        .position(|n| n.eq_ignore_ascii_case(text))
    {
        return Ok(field.first_named + i as u32);
    }
    let names = if field.names.is_empty() {
        String::new()
    } else {
        format!(
            " or a name {}-{}",
            field.names[0],
            field.names[field.names.len() - 1]
        )
    };
    Err(format!(
        "{text:?} is not a value: use a number {}..={}{names}",
        field.min, field.max
    ))
}

/// Cron expressions with whether Warren's grammar accepts them, edge cases
/// included. The agreement tests of configuration validation and of the
/// scheduler both walk this one list.
#[doc(hidden)]
pub const CRON_SAMPLES: &[(&str, bool)] = &[
    ("*/5 * * * * *", true),
    ("0 30 9 * * MON-FRI", true),
    ("0 0 12 * * mon,wed,fri", true),
    ("0 0 12 * JAN-MAR/2 *", true),
    ("0 0-30/10 8-18 * * 1-5", true),
    ("0 0 12 L * *", true),
    ("0 0 12 LW * *", true),
    ("0 0 12 15W * *", true),
    ("0 0 12 ? * FRI#L", true),
    ("0 0 12 ? * MON#1", true),
    ("0 0 12 * * 5L", true),
    ("0 0 12 ? * ?", true),
    ("0 0 12 * * 0,7", true),
    ("0 0 12 * * FRI-SUN", true),
    ("0 0 12 1 * +MON", true),
    ("0 1,,2 * * * *", true),
    ("*/100 * * * * *", true),
    ("@daily", true),
    ("@weekly", true),
    ("*/5 * * * *", false),
    ("0 0 0 * * * 2030", false),
    ("@reboot", false),
    ("", false),
    ("0 60 * * * *", false),
    ("0 0 24 * * *", false),
    ("0 0 0 0 * *", false),
    ("0 0 12 32W * *", false),
    ("0 0 12 * 13 *", false),
    ("0 0 12 * * 8", false),
    ("0 0 12 * JANUARY *", false),
    ("0 0 12 * * MONDAY", false),
    ("0 0 12 * * MON#6", false),
    ("0 0 12 15L * *", false),
    ("? * * * * *", false),
    ("*/0 * * * * *", false),
    ("5/10 * * * * *", false),
    ("0 0 18-9 * * *", false),
    ("*,5 * * * * *", false),
    ("0 0 12 * DEC *", true),
    ("0 0 12 * * 1-5/2", true),
    ("@hourly", true),
    ("0 0 12 * * MON#0", false),
    ("x * * * * *", false),
    ("0 , * * * *", false),
    ("0 0 12 ,, * *", false),
];

#[cfg(test)]
mod tests {
    use super::super::layering::DEFAULT_TOML;
    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn scheduler_rules() {
        one_issue(
            "[scheduler]\nmax_delay_ms = 0",
            "config key scheduler.max_delay_ms: 0 would reject every delayed task: set it \
             above 0, for example 315576000000 (10 years)",
        );
        one_issue(
            "[scheduler]\npoison_redeliveries = 0",
            "config key scheduler.poison_redeliveries: 0 would park a task after a single \
             worker crash: set it to at least 1, for example 5",
        );
        one_issue(
            "[scheduler]\ncancel_ttl_ms = 0",
            "config key scheduler.cancel_ttl_ms: 0 would forget cancel requests at once: set \
             it above 0, for example 86400000 (24 hours)",
        );
    }

    /// A `[[cron]]` entry with valid values except those `overrides` replace
    /// (`key = value` lines; a key given as `key` alone is left out).
    fn cron_entry(overrides: &[&str]) -> String {
        let mut lines = vec![
            "name = \"tick\"".to_string(),
            "schedule = \"*/5 * * * * *\"".to_string(),
            "task_type = \"diag.echo\"".to_string(),
        ];
        for o in overrides {
            let key = o.split('=').next().unwrap().trim();
            lines.retain(|l| !l.starts_with(&format!("{key} ")));
            if o.contains('=') {
                lines.push(o.to_string());
            }
        }
        format!("[[cron]]\n{}\n", lines.join("\n"))
    }

    #[test]
    fn cron_entries_default_to_none_and_fill_defaults() {
        assert!(Config::from_toml("").unwrap().cron.is_empty());
        let c = Config::from_toml(&cron_entry(&[])).unwrap();
        assert_eq!(
            c.cron,
            [CronConfig {
                name: "tick".into(),
                schedule: "*/5 * * * * *".into(),
                timezone: "UTC".into(),
                task_type: "diag.echo".into(),
                args: serde_json::json!({}),
                priority: None,
                missed: MissedFires::Skip,
            }]
        );
    }

    #[test]
    fn cron_args_keep_any_toml_value_as_json() {
        let c = Config::from_toml(&format!(
            "{}{}",
            cron_entry(&[
                "timezone = \"Europe/Paris\"",
                "priority = 7",
                "missed = \"run_once\"",
                "args = { url = \"https://example.com\", Headers = { X-Token = \"t\" }, \
                 n = 3, ok = true, list = [1, \"two\"] }",
            ]),
            cron_entry(&["name = \"other\"", "args = [1, 2]"]),
        ))
        .unwrap();
        let tick = &c.cron[0];
        assert_eq!(tick.timezone, "Europe/Paris");
        assert_eq!(tick.priority, Some(7));
        assert_eq!(tick.missed, MissedFires::RunOnce);
        assert_eq!(tick.missed.as_str(), "run_once");
        assert_eq!(
            tick.args,
            serde_json::json!({
                "url": "https://example.com",
                "Headers": {"X-Token": "t"},
                "n": 3,
                "ok": true,
                "list": [1, "two"],
            })
        );
        assert_eq!(c.cron[1].args, serde_json::json!([1, 2]));
    }

    #[test]
    fn cron_name_rules() {
        one_issue(
            &cron_entry(&["name"]),
            "config key cron[0].name: is missing or empty: name the schedule with lowercase \
             letters, digits, '_' or '-'",
        );
        one_issue(
            &cron_entry(&["name = \"Nightly Report\""]),
            "config key cron[0].name: \"Nightly Report\" is not a valid schedule name: use \
             lowercase letters, digits, '_' and '-' only",
        );
        let long = "a".repeat(65);
        one_issue(
            &cron_entry(&[&format!("name = \"{long}\"")]),
            &format!("config key cron[0].name: \"{long}\" is 65 characters long: use at most 64"),
        );
        one_issue(
            &format!("{}{}", cron_entry(&[]), cron_entry(&[])),
            "config key cron[1].name: \"tick\" is also the name of cron[0]: schedule names \
             must be unique; rename or remove one",
        );
    }

    #[test]
    fn cron_schedule_rules() {
        let schedule_issue = |schedule: &str, problem: &str| {
            one_issue(
                &cron_entry(&[&format!("schedule = \"{schedule}\"")]),
                &format!("config key cron[0].schedule: {problem}"),
            )
        };
        one_issue(
            &cron_entry(&["schedule"]),
            "config key cron[0].schedule: is missing or empty: set a cron expression with \
             seconds, such as \"0 */5 * * * *\" (every 5 minutes)",
        );
        schedule_issue(
            "*/5 * * * *",
            "\"*/5 * * * *\" has 5 fields, but schedules start with a seconds field: use 6, \
             for example \"0 */5 * * * *\" to fire at second 0",
        );
        schedule_issue(
            "0 0 0 * * * 2030",
            "\"0 0 0 * * * 2030\" has 7 fields: use 6, \"second minute hour day-of-month \
             month day-of-week\", for example \"0 */5 * * * *\" (every 5 minutes)",
        );
        schedule_issue(
            "0 60 * * * *",
            "\"0 60 * * * *\" is not a valid cron expression: minute field \"60\": 60 is out \
             of range: a minute is 0..=59",
        );
        schedule_issue(
            "0 0 9 * JAN-XYZ MON",
            "\"0 0 9 * JAN-XYZ MON\" is not a valid cron expression: month field \"JAN-XYZ\": \
             \"XYZ\" is not a value: use a number 1..=12 or a name JAN-DEC",
        );
        schedule_issue(
            "0 0 0 0 * *",
            "\"0 0 0 0 * *\" is not a valid cron expression: day-of-month field \"0\": 0 is \
             out of range: a day-of-month is 1..=31",
        );
        schedule_issue(
            "*/0 * * * * *",
            "\"*/0 * * * * *\" is not a valid cron expression: second field \"*/0\": the step \
             \"0\" of \"*/0\" must be a whole number of at least 1",
        );
        schedule_issue(
            "5/10 * * * * *",
            "\"5/10 * * * * *\" is not a valid cron expression: second field \"5/10\": \
             \"5/10\" steps from a single value: write \"*/10\", or a range such as \
             \"5-59/10\"",
        );
        schedule_issue(
            "0 0 18-9 * * *",
            "\"0 0 18-9 * * *\" is not a valid cron expression: hour field \"18-9\": the range \
             \"18-9\" runs backwards: write it from low to high",
        );
        schedule_issue(
            "? * * * * *",
            "\"? * * * * *\" is not a valid cron expression: second field \"?\": \"?\" is \
             allowed only in the day-of-month and day-of-week fields",
        );
        schedule_issue(
            "0 0 0 * * MON#6",
            "\"0 0 0 * * MON#6\" is not a valid cron expression: day-of-week field \"MON#6\": \
             the occurrence \"6\" of \"MON#6\" must be 1..=5 or L (the last)",
        );
        for ok in [
            "*/1 * * * * *",
            "0 30 9 * * MON-FRI",
            "0 0 0 1,15 * ?",
            "0 0 12 L * *",
            "0 0 12 15W * *",
            "0 0 12 ? * FRI#L",
            "0 0 12 * * 5L",
            "0 0 12 * * FRI-SUN",
            "0 0 12 * * 0,7",
            "0 0 12 * jan-mar/2 *",
            "0 0-30/10 8-18 * * 1-5",
            // The scheduler's parser skips empty list items.
            "0 1,,2 * * * *",
        ] {
            assert!(
                Config::from_toml(&cron_entry(&[&format!("schedule = \"{ok}\"")])).is_ok(),
                "{ok}"
            );
        }
    }

    #[test]
    fn cron_timezone_rules() {
        one_issue(
            &cron_entry(&["timezone = \"Europe/ Paris\""]),
            "config key cron[0].timezone: \"Europe/ Paris\" is not an IANA time zone name: use \
             one such as \"UTC\" (the default), \"Europe/Paris\" or \"America/New_York\"",
        );
        assert_eq!(issues(&cron_entry(&["timezone = \"\""])).len(), 1);
        assert_eq!(issues(&cron_entry(&["timezone = \"/UTC\""])).len(), 1);
        for ok in [
            "UTC",
            "Europe/Paris",
            "America/Argentina/Buenos_Aires",
            "Etc/GMT+3",
            "EST5EDT",
        ] {
            assert!(
                Config::from_toml(&cron_entry(&[&format!("timezone = \"{ok}\"")])).is_ok(),
                "{ok}"
            );
        }
    }

    #[test]
    fn cron_task_type_rules() {
        one_issue(
            &cron_entry(&["task_type"]),
            "config key cron[0].task_type: is missing or empty: set the task type each fire \
             publishes, such as \"diag.echo\"",
        );
        one_issue(
            &cron_entry(&["task_type = \"diag.*\""]),
            "config key cron[0].task_type: \"diag.*\" is not a task type: use words of \
             letters, digits, '_' or '-' joined by '.', without '*' or '#'",
        );
        one_issue(
            &cron_entry(&["task_type = \"report.build\""]),
            "config key cron[0].task_type: \"report.build\" matches no [[routes]] pattern and \
             no queue is default = true, so every fired task would be parked in \
             warren.unroutable: add a [[routes]] entry for it or mark a queue default = true",
        );
        // A default queue takes any type.
        let with_default = "[[queues]]\nname = \"default\"\ndefault = true\n\
                            [[routes]]\npattern = \"diag.*\"\nqueue = \"default\"\n";
        assert!(Config::from_toml(&format!(
            "{with_default}{}",
            cron_entry(&["task_type = \"report.build\""])
        ))
        .is_ok());
    }

    #[test]
    fn cron_priority_and_missed_rules() {
        one_issue(
            &cron_entry(&["priority = 10"]),
            "config key cron[0].priority: 10 is out of range: must be 0..=9 (task \
             priorities); lower it or leave it out",
        );
        let err = parse_error(&cron_entry(&["priority = -1"]));
        assert_eq!(
            err,
            "config key cron[0].priority: -1 is out of range: must be 0..=9 (task priorities) \
             (in config TOML)"
        );
        assert!(Config::from_toml(&cron_entry(&["priority = 0"])).is_ok());
        let err = parse_error(&cron_entry(&["missed = \"catch_up\""]));
        assert_eq!(
            err,
            "config key cron[0].missed: \"catch_up\" is not a missed-fire policy: use \"skip\" \
             or \"run_once\" (in config TOML)"
        );
        let err = parse_error(&cron_entry(&["every = \"5s\""]));
        assert!(
            err.starts_with("config key cron[0].every: unknown key (check the spelling)"),
            "{err}"
        );
    }

    #[test]
    fn documented_cron_example_is_valid_and_no_schedule_is_enabled() {
        let example: String = DEFAULT_TOML
            .split("# Example: every weekday")
            .nth(1)
            .expect("config/default.toml documents a [[cron]] example")
            .lines()
            .skip(1)
            .map_while(|l| l.strip_prefix("# "))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::from_toml(&example).unwrap();
        assert_eq!(c.cron[0].name, "morning-ping");
        assert_eq!(c.cron[0].timezone, "Europe/Paris");
        assert_eq!(c.cron[0].priority, Some(5));
        assert_eq!(c.cron[0].missed, MissedFires::RunOnce);
        assert_eq!(c.cron[0].args["method"], "GET");
        assert!(Config::from_toml("").unwrap().cron.is_empty());
    }

    #[test]
    fn every_cron_problem_is_reported_at_once() {
        let list = issues(&cron_entry(&[
            "name = \"A\"",
            "schedule = \"* * *\"",
            "timezone = \"\"",
            "task_type = \"nowhere\"",
            "priority = 12",
        ]));
        let keys: Vec<&str> = list.iter().map(|i| i.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "config key cron[0].name",
                "config key cron[0].schedule",
                "config key cron[0].timezone",
                "config key cron[0].task_type",
                "config key cron[0].priority",
            ]
        );
    }

    /// The grammar is croner's, configured as the scheduler runs it: each
    /// expression is accepted or refused alike by [`parse_cron`] and by
    /// validation (the scheduler's side is checked in warren-scheduler).
    #[test]
    fn cron_validation_uses_the_scheduler_parser() {
        // Parses, though it fires on no day: the scheduler refuses it for
        // that (a check of meaning, not of grammar), so it is not a sample.
        let cases = CRON_SAMPLES.iter().copied().chain([("0 0 12 * * L", true)]);
        for (expr, accepted) in cases {
            assert_eq!(parse_cron(expr).is_ok(), accepted, "parse_cron({expr:?})");
            let toml = cron_entry(&[&format!("schedule = \"{expr}\"")]);
            assert_eq!(
                Config::from_toml(&toml).is_ok(),
                accepted,
                "validation of {expr:?}"
            );
        }
    }

    #[test]
    fn cron_messages_name_the_item_the_parser_refuses() {
        let schedule_issue = |schedule: &str, problem: &str| {
            one_issue(
                &cron_entry(&[&format!("schedule = \"{schedule}\"")]),
                &format!("config key cron[0].schedule: {problem}"),
            )
        };
        // The first failing field, and in it the failing item, are blamed.
        schedule_issue(
            "0 1,,2 24,25 * * *",
            "\"0 1,,2 24,25 * * *\" is not a valid cron expression: hour field \"24,25\": 24 \
             is out of range: a hour is 0..=23",
        );
        schedule_issue(
            "0 0 12 1,32W * *",
            "\"0 0 12 1,32W * *\" is not a valid cron expression: day-of-month field \
             \"1,32W\": 32 is out of range: a day-of-month is 1..=31",
        );
        // Empty lists parse, but match nothing: finding the next fire time
        // ran for minutes, so the scheduler hung at start.
        schedule_issue(
            "0 , * * * FRI-SUN",
            "\"0 , * * * FRI-SUN\" is not a valid cron expression: minute field \",\" lists no \
             value: write at least one, or \"*\" for every minute",
        );
        schedule_issue(
            "*,5 * * * * *",
            "\"*,5 * * * * *\" is not a valid cron expression: second field \"*,5\": \"*\" \
             cannot be one item of a list: write \"*\" alone",
        );
    }
}
