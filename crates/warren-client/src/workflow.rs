//! Building workflows (contract section 8): a [`Chain`] is a first task
//! carrying the steps that follow it in `x-warren-chain`; a [`Group`] is
//! tasks sharing one `x-warren-workflow` id. Both are plain task messages,
//! so [`Client::publish_chain`](crate::Client::publish_chain) and
//! [`Client::publish_group`](crate::Client::publish_group) only set headers.

use serde::Deserialize;
use serde_json::Value;
use warren_core::chord;
use warren_core::event::new_id;
use warren_core::workflow::{self, After, Step};

use crate::{ClientError, TaskRequest};

/// A chain: its first task, then each step in order, each receiving the
/// previous step's result in its arguments' `previous` key.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The first task (its id roots the steps' default ids).
    pub first: TaskRequest,
    /// The steps after it.
    pub steps: Vec<Step>,
    /// The workflow id; the first task's id when `None`.
    pub workflow_id: Option<String>,
}

impl TaskRequest {
    /// A chain starting with this task, then `step`.
    pub fn then(self, step: Step) -> Chain {
        Chain {
            first: self,
            steps: vec![step],
            workflow_id: None,
        }
    }
}

impl Chain {
    /// Adds a step after the last one.
    pub fn then(mut self, step: Step) -> Chain {
        self.steps.push(step);
        self
    }

    /// Adds a step of `task_type` with `args` that runs whatever became of
    /// the steps before it (`"after": "always"`).
    pub fn finally(mut self, task_type: &str, args: Value) -> Chain {
        let mut s = Step::new(task_type, args);
        s.after = After::Always;
        self.steps.push(s);
        self
    }

    /// Names the workflow (a group of chains shares one id).
    pub fn workflow_id(mut self, id: impl Into<String>) -> Chain {
        self.workflow_id = Some(id.into());
        self
    }

    /// The first task's message, its id fixed (so the steps' ids are
    /// known: `<id>.1`, `<id>.2`, … unless a step names its own), with the
    /// chain in its headers. Refuses what a worker would make dead
    /// `invalid`: a chain over its bounds, a bad step, a long id.
    pub fn request(&self) -> Result<TaskRequest, ClientError> {
        let bad = |m: String| ClientError::InvalidRequest(format!("chain: {m}"));
        let id = self.first.id.clone().unwrap_or_else(new_id);
        if id.len() > workflow::MAX_ID_BYTES {
            return Err(bad(format!(
                "the first task's id is longer than {} bytes",
                workflow::MAX_ID_BYTES
            )));
        }
        if let Some(w) = &self.workflow_id {
            if w.is_empty() || w.len() > workflow::MAX_ID_BYTES {
                return Err(bad(format!(
                    "the workflow id must be 1 to {} bytes",
                    workflow::MAX_ID_BYTES
                )));
            }
        }
        let text = workflow::encode_chain(&self.steps);
        workflow::parse_chain(&text).map_err(bad)?;
        let mut req = self.first.clone().id(id);
        if !self.steps.is_empty() {
            req = req.header_str(workflow::CHAIN, &text);
        }
        if let Some(w) = &self.workflow_id {
            req = req.header_str(workflow::WORKFLOW, w);
        }
        Ok(req)
    }

    /// The ids every task of the chain will have, first task first.
    pub fn ids(&self, first_id: &str) -> Vec<String> {
        let mut out = vec![first_id.to_owned()];
        for (k, s) in self.steps.iter().enumerate() {
            out.push(
                s.id.clone()
                    .unwrap_or_else(|| format!("{first_id}.{}", k + 1)),
            );
        }
        out
    }
}

/// A group: tasks published under one workflow id, counted together by the
/// tracker (`GET /api/workflows/{id}`, `warren workflow status`).
#[derive(Debug, Clone)]
pub struct Group {
    /// The group's workflow id.
    pub id: String,
    /// Its members (each may be a chain).
    pub members: Vec<Chain>,
}

impl Group {
    /// An empty group named `id`.
    pub fn new(id: impl Into<String>) -> Group {
        Group {
            id: id.into(),
            members: Vec::new(),
        }
    }

    /// Adds a task.
    pub fn task(mut self, req: TaskRequest) -> Group {
        self.members.push(Chain {
            first: req,
            steps: Vec::new(),
            workflow_id: None,
        });
        self
    }

    /// Adds a chain.
    pub fn chain(mut self, chain: Chain) -> Group {
        self.members.push(chain);
        self
    }

    /// The members' messages, each with the group's id.
    pub fn requests(&self) -> Result<Vec<TaskRequest>, ClientError> {
        self.members
            .iter()
            .map(|c| c.clone().workflow_id(self.id.clone()).request())
            .collect()
    }
}

/// A workflow as `warren workflow start` reads it from JSON: a chain
/// (`{"chain": [step, …], "workflow_id"?}`: the first step is the first
/// task) or a group (`{"group": "<id>", "tasks": [step or {"chain": [...]},
/// …]}`). Steps are written as in `x-warren-chain`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum WorkflowSpec {
    /// `{"chord": id, "tasks": [step, ...], "callback": step}`: members
    /// (single tasks) and the callback that runs once all are final.
    Chord {
        /// The chord id.
        chord: String,
        /// Its members, in order.
        tasks: Vec<Step>,
        /// What runs once every member is final, with their outcomes.
        callback: Step,
    },
    /// A chain.
    Chain {
        /// Its tasks in order (at least one).
        chain: Vec<Step>,
        /// Its workflow id (default: the first task's id).
        #[serde(default)]
        workflow_id: Option<String>,
    },
    /// A group.
    Group {
        /// The group's workflow id.
        group: String,
        /// Its members.
        tasks: Vec<Member>,
    },
}

/// A member of a group in a [`WorkflowSpec`].
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Member {
    /// A chain of tasks.
    Chain {
        /// Its tasks in order (at least one).
        chain: Vec<Step>,
    },
    /// One task.
    Task(Step),
}

/// A step as a task request (its type, args, id and options).
/// The request of a single task described as a step (its type, args, id,
/// priority, retries and timeout).
pub fn step_request(s: &Step) -> TaskRequest {
    let mut r = TaskRequest::new(s.task_type.clone(), s.args.clone());
    if let Some(id) = &s.id {
        r = r.id(id.clone());
    }
    if let Some(p) = s.priority {
        r = r.priority(p);
    }
    if let Some(n) = s.max_retries {
        r = r.header_int(
            warren_core::headers::MAX_RETRIES,
            n.min(i64::MAX as u64) as i64,
        );
    }
    if let Some(ms) = s.timeout_ms {
        r = r.header_int(
            warren_core::headers::TIMEOUT_MS,
            ms.min(i64::MAX as u64) as i64,
        );
    }
    r
}

fn chain_of(steps: &[Step]) -> Result<Chain, ClientError> {
    let (first, rest) = steps
        .split_first()
        .ok_or_else(|| ClientError::InvalidRequest("a chain needs at least one task".into()))?;
    Ok(Chain {
        first: step_request(first),
        steps: rest.to_vec(),
        workflow_id: None,
    })
}

impl WorkflowSpec {
    /// Reads a workflow from JSON text.
    pub fn from_json(text: &str) -> Result<WorkflowSpec, ClientError> {
        serde_json::from_str(text).map_err(|e| {
            ClientError::InvalidRequest(format!(
                "not a workflow ({{\"chain\": [...]}}, {{\"group\": id, \"tasks\": [...]}} or {{\"chord\": id, \"tasks\": [...], \"callback\": step}}): {e}"
            ))
        })
    }

    /// The chains to publish, each with its workflow id set.
    pub fn chains(&self) -> Result<Vec<Chain>, ClientError> {
        match self {
            WorkflowSpec::Chord { .. } => Err(ClientError::InvalidRequest(
                "a chord is published with Client::publish_chord".into(),
            )),
            WorkflowSpec::Chain { chain, workflow_id } => {
                let mut c = chain_of(chain)?;
                c.workflow_id = workflow_id.clone();
                Ok(vec![c])
            }
            WorkflowSpec::Group { group, tasks } => tasks
                .iter()
                .map(|m| {
                    let c = match m {
                        Member::Chain { chain } => chain_of(chain)?,
                        Member::Task(s) => chain_of(std::slice::from_ref(s))?,
                    };
                    Ok(c.workflow_id(group.clone()))
                })
                .collect(),
        }
    }
}

/// A chord (contract section 8): members, each a single task, and a
/// callback that runs once when every member has reached a final outcome,
/// with their outcomes in member order in its `results` argument.
#[derive(Debug, Clone)]
pub struct Chord {
    /// The chord id (also its members' workflow id).
    pub id: String,
    /// Its members, in order; a member without an id gets `<chord id>.<index>`.
    pub members: Vec<TaskRequest>,
    /// Its callback; its id defaults to `<chord id>.callback`.
    pub callback: Step,
}

impl Chord {
    /// A chord `id` with no members yet and `callback`.
    pub fn new(id: impl Into<String>, callback: Step) -> Chord {
        Chord {
            id: id.into(),
            members: Vec::new(),
            callback,
        }
    }

    /// Adds a member.
    pub fn task(mut self, req: TaskRequest) -> Chord {
        self.members.push(req);
        self
    }

    /// The start message (checked): its size and callback.
    pub fn start(&self) -> Result<chord::Start, ClientError> {
        let bad = |m: String| ClientError::InvalidRequest(format!("chord {:?}: {m}", self.id));
        if self.id.is_empty() || self.id.len() > workflow::MAX_ID_BYTES {
            return Err(bad(format!(
                "the chord id must be 1 to {} bytes",
                workflow::MAX_ID_BYTES
            )));
        }
        let start = chord::Start {
            size: self.members.len(),
            callback: self.callback.clone(),
        };
        chord::Start::parse(Some(&self.id), &start.encode()).map_err(bad)
    }

    /// The members' requests: each with the chord headers, and an id.
    pub fn requests(&self) -> Result<Vec<TaskRequest>, ClientError> {
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if m.headers.inner().contains_key(workflow::CHAIN) {
                    return Err(ClientError::InvalidRequest(format!(
                        "chord {:?}: member {i} carries a chain, which a chord member cannot",
                        self.id
                    )));
                }
                let mut r = m.clone();
                if r.id.is_none() {
                    r = r.id(format!("{}.{i}", self.id));
                }
                chord::member_headers(&mut r.headers, &self.id, i);
                Ok(r)
            })
            .collect()
    }

    /// The callback's id.
    pub fn callback_id(&self) -> String {
        chord::callback_id(&self.id, &self.callback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use warren_core::headers;

    #[test]
    fn a_chain_request_carries_its_steps_and_fixes_its_id() {
        let c = TaskRequest::new("diag.add", json!({}))
            .id("c1")
            .then(Step::new("diag.add", json!({"add": 2})))
            .finally("diag.echo", json!({}));
        let r = c.request().unwrap();
        assert_eq!(r.id.as_deref(), Some("c1"));
        let text = headers::get_str(Some(&r.headers), workflow::CHAIN).unwrap();
        assert_eq!(workflow::parse_chain(&text).unwrap(), c.steps);
        assert_eq!(c.ids("c1"), ["c1", "c1.1", "c1.2"]);
    }

    #[test]
    fn a_chain_over_its_bounds_is_refused_before_publishing() {
        let mut c = TaskRequest::new("diag.add", json!({})).then(Step::new("diag.add", json!({})));
        for _ in 0..100 {
            c = c.then(Step::new("diag.add", json!({})));
        }
        let e = c.request().unwrap_err().to_string();
        assert!(e.contains("101 steps"), "{e}");
    }

    #[test]
    fn specs_read_chains_and_groups() {
        let s = WorkflowSpec::from_json(
            r#"{"chain": [{"type": "diag.add", "id": "a"}, {"type": "diag.add"}]}"#,
        )
        .unwrap();
        let c = &s.chains().unwrap()[0];
        assert_eq!(c.first.id.as_deref(), Some("a"));
        assert_eq!(c.steps.len(), 1);
        let g = WorkflowSpec::from_json(
            r#"{"group": "g", "tasks": [{"type": "diag.echo"}, {"chain": [{"type": "diag.add"}, {"type": "diag.add"}]}]}"#,
        )
        .unwrap();
        let cs = g.chains().unwrap();
        assert_eq!(cs.len(), 2);
        assert!(cs.iter().all(|c| c.workflow_id.as_deref() == Some("g")));
        assert_eq!(cs[1].steps.len(), 1);
        assert!(WorkflowSpec::from_json(r#"{"chain": []}"#)
            .unwrap()
            .chains()
            .is_err());
        assert!(WorkflowSpec::from_json(r#"{"nothing": 1}"#).is_err());
    }

    #[test]
    fn a_chord_numbers_its_members_and_checks_its_start() {
        let c = Chord::new("ch", Step::new("diag.echo", json!({})))
            .task(TaskRequest::new("diag.echo", json!({})))
            .task(TaskRequest::new("diag.echo", json!({})).id("mine"));
        let reqs = c.requests().unwrap();
        let ids: Vec<_> = reqs.iter().map(|r| r.id.clone().unwrap()).collect();
        assert_eq!(ids, ["ch.0", "mine"]);
        let m = chord::Member::from_headers(Some(&reqs[1].headers))
            .unwrap()
            .unwrap();
        assert_eq!((m.chord_id.as_str(), m.index), ("ch", 1));
        assert_eq!(
            headers::get_str(Some(&reqs[0].headers), workflow::WORKFLOW).as_deref(),
            Some("ch")
        );
        assert_eq!(c.start().unwrap().size, 2);
        assert_eq!(c.callback_id(), "ch.callback");
        let empty = Chord::new("e", Step::new("diag.echo", json!({})));
        assert!(empty.start().unwrap_err().to_string().contains("members"));
        let chained = Chord::new("x", Step::new("diag.echo", json!({})))
            .task(TaskRequest::new("diag.echo", json!({})).header_str(workflow::CHAIN, "[]"));
        assert!(chained
            .requests()
            .unwrap_err()
            .to_string()
            .contains("chain"));
        let spec = WorkflowSpec::from_json(
            r#"{"chord": "j", "tasks": [{"type": "a.b"}], "callback": {"type": "c.d"}}"#,
        )
        .unwrap();
        assert!(matches!(spec, WorkflowSpec::Chord { ref chord, .. } if chord == "j"));
    }
}
