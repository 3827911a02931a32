//! Tenant fairness (contract section 9, `warren_core::tenants`): the
//! directories of tenant queues this worker has read, and where a task
//! with a tenant moves to.
//!
//! Every worker reads the directory stream `P.q.<name>.tenants` of each work
//! queue it consumes that has `tenants = true`, from its first record, and
//! consumes every tenant queue admitted there (and the overflow once
//! listed). A task with a tenant read from the work queue itself moves to
//! its tenant's queue: when that queue is not listed yet and the cap is not
//! reached, the worker appends its record (confirmed) and waits to read it
//! back, so that all workers agree on which hashes are admitted.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio::sync::watch;
use warren_client::ClientError;
use warren_core::tenants::{self, Directory, Learned, Place, OVERFLOW};
use warren_core::topology::{field_table, work_queue_arguments};
use warren_core::{Config, Names};

use super::session::Session;
use super::{Source, SourceKind};

/// How long a move waits to read back the record it appended before it
/// puts its task back on its queue instead (the directory is read by the
/// same worker, so this is only reached when the broker is in trouble).
const READ_BACK: Duration = Duration::from_secs(10);

/// The tenant state of every work queue consumed with `tenants = true`.
#[derive(Default)]
pub(super) struct Tenants {
    queues: BTreeMap<String, Arc<QueueTenants>>,
    /// The tenant queues learned so far, in the order learned: consumed
    /// like the configured queues.
    sources: Mutex<Vec<Arc<Source>>>,
}

/// One work queue's tenants.
pub(super) struct QueueTenants {
    short: String,
    /// `P.q.<name>.tenants`.
    pub(super) directory: String,
    /// The arguments tenant queues are declared with: their work queue's.
    pub(super) arguments: FieldTable,
    max_priority: u8,
    read: Mutex<Directory>,
    /// Bumped on every record read.
    version: watch::Sender<u64>,
    /// Hashes whose record this worker is appending now.
    appending: Mutex<HashSet<String>>,
}

impl Tenants {
    /// The tenant state of the work queues consumed that have tenants.
    pub(super) fn new(config: &Config, names: &Names) -> Self {
        let queues = config
            .worker_queues()
            .into_iter()
            .filter(|q| q.tenants)
            .map(|q| {
                let t = QueueTenants {
                    short: q.name.clone(),
                    directory: tenants::directory(names, &q.name),
                    arguments: field_table(&work_queue_arguments(config, q)),
                    max_priority: q.max_priority,
                    read: Mutex::new(Directory::new(q.tenants_max)),
                    version: watch::Sender::new(0),
                    appending: Mutex::default(),
                };
                (q.name.clone(), Arc::new(t))
            })
            .collect();
        Tenants {
            queues,
            sources: Mutex::default(),
        }
    }

    /// The tenants of work queue `short`, if it has them.
    pub(super) fn of(&self, short: &str) -> Option<&Arc<QueueTenants>> {
        self.queues.get(short)
    }

    /// Every work queue with tenants.
    pub(super) fn all(&self) -> impl Iterator<Item = &Arc<QueueTenants>> {
        self.queues.values()
    }

    /// The tenant queues learned so far.
    pub(super) fn sources(&self) -> Vec<Arc<Source>> {
        self.sources.lock().expect("tenant sources lock").clone()
    }

    /// How many tenant queues (overflow included) are known.
    pub(super) fn known(&self) -> usize {
        self.sources.lock().expect("tenant sources lock").len()
    }

    /// Reads one record of `short`'s directory: true when it lists a queue
    /// not consumed before (now among [`Tenants::sources`]).
    pub(super) fn learn(&self, names: &Names, short: &str, body: &[u8]) -> bool {
        let Some(q) = self.queues.get(short) else {
            return false;
        };
        let learned = q.read.lock().expect("directory lock").learn(body);
        q.version.send_modify(|v| *v += 1);
        let Learned::Consume(slot) = learned else {
            return false;
        };
        let source = Arc::new(Source {
            short: short.to_owned(),
            full: tenants::tenant_queue(names, short, &slot),
            max_priority: q.max_priority,
            kind: SourceKind::Tenant,
        });
        self.sources
            .lock()
            .expect("tenant sources lock")
            .push(source);
        true
    }
}

impl QueueTenants {
    /// The work queue's short name.
    pub(super) fn short(&self) -> &str {
        &self.short
    }

    /// Where the tasks of the tenant with hash `hash` go: its tenant queue,
    /// or the overflow queue, declared on this session (its record
    /// appended and read back first, when new). `Ok(None)`: the record was
    /// not read back in time; the caller puts the task back on its queue.
    pub(super) async fn destination(
        &self,
        session: &Session,
        names: &Names,
        hash: &str,
    ) -> Result<Option<String>, ClientError> {
        let mut place = self.place(hash);
        if place == Place::Unknown {
            if !self.listed_after(session, hash).await? {
                return Ok(None);
            }
            place = self.place(hash);
        }
        let slot = match place {
            Place::Own => hash,
            _ => {
                let listed = self.read.lock().expect("directory lock").has_overflow();
                if !listed && !self.listed_after(session, OVERFLOW).await? {
                    return Ok(None);
                }
                OVERFLOW
            }
        };
        let queue = tenants::tenant_queue(names, &self.short, slot);
        session.declare_once(&queue, &self.arguments).await?;
        Ok(Some(queue))
    }

    fn place(&self, hash: &str) -> Place {
        self.read.lock().expect("directory lock").place(hash)
    }

    fn listed(&self, slot: &str) -> bool {
        let d = self.read.lock().expect("directory lock");
        if slot == OVERFLOW {
            d.has_overflow()
        } else {
            d.knows(slot)
        }
    }

    /// Appends the record of `slot` (unless this worker is appending it
    /// already) and waits to read it back: false if not read in time.
    async fn listed_after(&self, session: &Session, slot: &str) -> Result<bool, ClientError> {
        let mut seen = self.version.subscribe();
        let first = self
            .appending
            .lock()
            .expect("appending lock")
            .insert(slot.to_owned());
        if first {
            let sent = self.append(session, slot).await;
            if sent.is_err() {
                self.appending.lock().expect("appending lock").remove(slot);
            }
            sent?;
        }
        let read = tokio::time::timeout(READ_BACK, seen.wait_for(|_| self.listed(slot))).await;
        if first {
            self.appending.lock().expect("appending lock").remove(slot);
        }
        Ok(matches!(read, Ok(Ok(_))))
    }

    /// Publishes the record of `slot` to the directory, confirmed.
    async fn append(&self, session: &Session, slot: &str) -> Result<(), ClientError> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("text/plain".into());
        let confirm = session
            .outbox
            .channel
            .send_mandatory("", &self.directory, slot.as_bytes(), props)
            .await?;
        let c = confirm.await.map_err(ClientError::amqp(format!(
            "confirm of a record in {}",
            self.directory
        )))?;
        if c.is_nack() {
            return Err(ClientError::Nacked {
                task_id: format!("tenant record {slot}"),
            });
        }
        if c.take_message().is_some() {
            return Err(ClientError::InvalidRequest(format!(
                "the broker has no queue {}: run `warren topology apply`",
                self.directory
            )));
        }
        Ok(())
    }
}

/// Where a delivery from work queue `short` moves: `Err` when its tenant
/// header is bad (the task is invalid); else as
/// [`QueueTenants::destination`].
pub(super) async fn move_to(
    sh: &super::Shared,
    session: &Session,
    short: &str,
    d: &lapin::message::Delivery,
) -> Result<Result<Option<String>, ClientError>, warren_core::InvalidTask> {
    let hash = match tenants::tenant_hash(d.properties.headers().as_ref()) {
        Ok(Some(hash)) => hash,
        Ok(None) | Err(_) => {
            return Err(warren_core::InvalidTask::new(
                "tenant",
                tenants::BadTenant.to_string(),
            ))
        }
    };
    let Some(t) = sh.tenants.of(short) else {
        return Ok(Ok(None));
    };
    Ok(t.destination(session, &sh.names, &hash).await)
}
