//! Names of every exchange and queue, derived from the prefix.

/// The names of Warren's broker objects for one prefix (`P` in the contract).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
    /// `P.events`, named once: every status event is published to it.
    events: String,
}

impl Names {
    /// Names for the given prefix (for example `warren`).
    pub fn new(prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        Self {
            events: format!("{prefix}.events"),
            prefix,
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn join(&self, rest: &str) -> String {
        format!("{}.{}", self.prefix, rest)
    }

    /// `P.tasks`: topic exchange for immediate tasks, routing key = task type.
    pub fn tasks(&self) -> String {
        self.join("tasks")
    }

    /// `P.delay`: exchange for delayed tasks.
    pub fn delay(&self) -> String {
        self.join("delay")
    }

    /// `P.delay.intake`: durable queue holding delayed tasks until a scheduler takes them.
    pub fn delay_intake(&self) -> String {
        self.join("delay.intake")
    }

    /// `P.events`: topic exchange for status events.
    pub fn events(&self) -> String {
        self.events.clone()
    }

    /// `P.events`, borrowed (what [`Names::events`] returns, without a copy).
    pub fn events_exchange(&self) -> &str {
        &self.events
    }

    /// `P.control`: fanout exchange for control commands.
    pub fn control(&self) -> String {
        self.join("control")
    }

    /// `P.unroutable`: fanout exchange and queue for tasks no route matched.
    pub fn unroutable(&self) -> String {
        self.join("unroutable")
    }

    /// `P.dead`: parking lot for tasks that reached a terminal failure.
    pub fn dead(&self) -> String {
        self.join("dead")
    }

    /// `P.dlx`: fanout exchange that work queues dead-letter to (expired, rejected).
    pub fn dead_letter_exchange(&self) -> String {
        self.join("dlx")
    }

    /// `P.dlx.intake`: queue where the scheduler classifies dead-lettered tasks.
    pub fn dead_letter_intake(&self) -> String {
        self.join("dlx.intake")
    }

    /// `P.q.<name>`: the work queue for a `[[queues]]` entry.
    pub fn work_queue(&self, short: &str) -> String {
        self.join(&format!("q.{short}"))
    }

    /// `P.q.<name>.lane.<k>`: lane `k` (0 = lowest priorities) of a quorum
    /// work queue sorted by lanes (see [`crate::lanes`]).
    pub fn lane_queue(&self, short: &str, k: u8) -> String {
        format!("{}.lane.{k}", self.work_queue(short))
    }

    /// The short queue name (`io`) of a work queue name (`P.q.io`) or of one
    /// of its lanes (`P.q.io.lane.2`), if it is one.
    pub fn short_queue_name<'a>(&self, full: &'a str) -> Option<&'a str> {
        let short = full
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".q.")?;
        // Short names hold no '.', so only a lane's name has one.
        Some(short.split_once('.').map_or(short, |(queue, _)| queue))
    }

    /// `P.wait.<n>s`: a delay tier holding tasks for `n` seconds before they
    /// dead-letter to `P.wait.due`.
    pub fn wait_tier(&self, seconds: u64) -> String {
        self.join(&format!("wait.{seconds}s"))
    }

    /// `P.release.<n>s`: exchange and queue of a release tier, holding a task
    /// for the last `n` whole seconds before its due time, then
    /// dead-lettering it into `P.tasks` under its own type.
    pub fn release_tier(&self, seconds: u64) -> String {
        self.join(&format!("release.{seconds}s"))
    }

    /// `P.wait.due`: exchange and queue where tasks leaving a delay tier
    /// return to the scheduler for their next hop or release.
    pub fn wait_due(&self) -> String {
        self.join("wait.due")
    }

    /// `P.cancels`: stream of cancel commands, read from its start by every
    /// worker and scheduler on boot, so cancels survive restarts.
    pub fn cancels(&self) -> String {
        self.join("cancels")
    }

    /// `P.escrow`: fanout exchange and queue holding the escrow copies of
    /// tasks running longer than the broker's consumer timeout; an expired
    /// copy dead-letters back to its work queue.
    pub fn escrow(&self) -> String {
        self.join("escrow")
    }

    /// `P.paused.<type>`: where workers park the tasks of a paused task
    /// type found on a work queue that carries other types; moved back to
    /// their queues when the type is resumed.
    pub fn paused_type(&self, task_type: &str) -> String {
        self.join(&format!("paused.{task_type}"))
    }

    /// `P.chords`: fanout exchange and queue of chord starts (contract
    /// section 8), which one scheduler at a time consumes to fold chords.
    pub fn chords(&self) -> String {
        self.join("chords")
    }

    /// `P.chord.<id>`: the outcomes of chord `id`'s members, declared by
    /// whoever publishes one and by the scheduler that folds them.
    pub fn chord_queue(&self, id: &str) -> String {
        self.join(&format!("chord.{id}"))
    }

    /// `P.tracker.published`: a bounded queue holding a copy of every task
    /// published to `P.tasks` (on a route) or `P.delay`, which the tracker
    /// reads so that a task is visible from its publication on.
    pub fn tracker_published(&self) -> String {
        self.join("tracker.published")
    }

    /// `P.control.<host>-<pid>`-style name for per-process objects.
    pub fn per_process(&self, what: &str, identity: &str) -> String {
        self.join(&format!("{what}.{}", identity.replace('/', "-")))
    }

    /// `P.watch.<id>`: an exclusive queue a client binds to `P.events` to follow tasks.
    pub fn watch_queue(&self, id: &str) -> String {
        self.join(&format!("watch.{id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix() {
        let n = Names::new("acme");
        assert_eq!(n.tasks(), "acme.tasks");
        assert_eq!(n.work_queue("io"), "acme.q.io");
        assert_eq!(n.short_queue_name("acme.q.io"), Some("io"));
        assert_eq!(n.short_queue_name("other.q.io"), None);
        assert_eq!(n.lane_queue("io", 2), "acme.q.io.lane.2");
        assert_eq!(n.short_queue_name("acme.q.io.lane.2"), Some("io"));
        assert_eq!(n.dead(), "acme.dead");
    }
}
