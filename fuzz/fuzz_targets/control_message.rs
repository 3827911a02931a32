//! A message on the cancel stream, read as every worker and scheduler reads
//! it (`ControlMessage::parse`), and the body `warren cancel` writes for a
//! task id (`ControlMessage::to_json`).
//!
//! Input: the message body, as is; it is also used (as text) as a task id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use warren_core::control::ControlMessage;

fuzz_target!(|data: &[u8]| {
    let parsed = ControlMessage::parse(data);
    if let Some(m) = &parsed {
        assert_eq!(ControlMessage::parse(&m.to_json()).as_ref(), Some(m));
        let v: Value = serde_json::from_slice(data).expect("a command is JSON");
        match m {
            ControlMessage::Cancel(id) => assert_eq!(v["cancel"].as_str(), Some(id.as_str())),
            ControlMessage::Marker(id) => {
                assert!(!v["cancel"].is_string(), "a cancel wins over a marker");
                assert_eq!(v["marker"].as_str(), Some(id.as_str()));
            }
            ControlMessage::Lease {
                task_id,
                escrow_id,
                until_ms,
            } => {
                assert!(!v["cancel"].is_string() && !v["marker"].is_string());
                assert_eq!(v["lease"].as_str(), Some(task_id.as_str()));
                assert_eq!(v["escrow"].as_str(), Some(escrow_id.as_str()));
                assert_eq!(v["until"].as_i64(), Some(*until_ms));
            }
            ControlMessage::EscrowDone { task_id, escrow_id } => {
                assert!(!v["cancel"].is_string() && !v["marker"].is_string());
                assert!(!v["lease"].is_string() || v["until"].as_i64().is_none());
                assert_eq!(v["escrow_done"].as_str(), Some(task_id.as_str()));
                assert_eq!(v["escrow"].as_str(), Some(escrow_id.as_str()));
            }
            ControlMessage::Change { task_id, at_ms, .. } => {
                assert_eq!(v["change"].as_str(), Some(task_id.as_str()));
                assert_eq!(v["at"].as_i64(), Some(*at_ms));
            }
            ControlMessage::Pause { target, at_ms } => {
                assert_eq!(v["pause"].as_str(), Some(target.kind.as_str()));
                assert_eq!(v["name"].as_str(), Some(target.name.as_str()));
                assert_eq!(v["at"].as_i64(), Some(*at_ms));
            }
            ControlMessage::Resume { target, at_ms } => {
                assert_eq!(v["resume"].as_str(), Some(target.kind.as_str()));
                assert_eq!(v["name"].as_str(), Some(target.name.as_str()));
                assert_eq!(v["at"].as_i64(), Some(*at_ms));
            }
        }
    }
    // Any id, however odd, comes back from the command written for it.
    let id = String::from_utf8_lossy(data).into_owned();
    let cancel = ControlMessage::Cancel(id);
    assert_eq!(ControlMessage::parse(&cancel.to_json()), Some(cancel));
});
