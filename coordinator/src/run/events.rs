//! One handler per server [`Event`]: a worker joined, left, sent a result, a failure or a malformed
//! frame. Each validates what the worker said against the scheduler and the batch, then updates the
//! collector, the counters and the strikes; none does I/O beyond queueing messages to workers.

use super::*;

impl Trainer {
    pub(super) fn handle(
        &mut self,
        ev: Event,
        version: u64,
        mode: Mode,
        by_id: &HashMap<TaskId, TaskSpec>,
        collector: &mut BatchCollector,
    ) -> Result<Vec<Action>, RunError> {
        let now = Instant::now();
        match ev {
            Event::Joined { worker, name, capacity, outbox } => {
                let limit = capacity as usize * self.config.cluster.tasks_in_flight;
                if self.names_seen.len() < MAX_TASK_FAILURES {
                    self.names_seen.insert(name.clone());
                }
                // One process per name: older connections under it are a restarted worker's dead ones.
                let mut actions = Vec::new();
                let older: Vec<WorkerId> =
                    self.workers.iter().filter(|(_, w)| w.name == name).map(|(&id, _)| id).collect();
                for old in older {
                    tracing::info!(
                        "worker {old} ({name}) superseded by worker {worker} under the same name (a restart?): \
                         its tasks are queued again and it gets no more"
                    );
                    actions.extend(self.scheduler.worker_retired(old, now));
                }
                self.workers.insert(worker, WorkerEntry { name, outbox, quarantined: false });
                self.max_workers = self.max_workers.max(self.workers.len());
                metrics::gauge!("metatrain_workers_connected").set(self.workers.len() as f64);
                metrics::counter!("metatrain_workers_joined_total").increment(1);
                actions.extend(self.scheduler.worker_joined(worker, limit, now));
                Ok(actions)
            }
            Event::Left { worker, reason } => {
                if let Some(w) = self.workers.remove(&worker) {
                    tracing::info!("worker {worker} ({}) left: {reason}", w.name);
                    metrics::counter!("metatrain_workers_lost_total").increment(1);
                }
                metrics::gauge!("metatrain_workers_connected").set(self.workers.len() as f64);
                Ok(self.scheduler.worker_left(worker, now))
            }
            Event::Malformed { worker, reason } => {
                // The connection is already closed; the strike is what stops a worker from repeating it
                // on every reconnect.
                self.reject("malformed_frame");
                self.last_rejection = Some(format!("a malformed result frame: {reason}"));
                self.strike(worker, &format!("a malformed result frame: {reason}"));
                Ok(Vec::new())
            }
            Event::TaskFailed { worker, id, version: v, reason } => {
                metrics::counter!("metatrain_tasks_failed_total").increment(1);
                if !self.scheduler.holds(worker, id) {
                    self.reject("not_assigned");
                    self.strike(worker, "a failure report for a task it was not computing");
                    return Ok(Vec::new());
                }
                if self.scheduler.in_batch(id) {
                    if v == version {
                        tracing::warn!("worker {worker} could not compute task {id}: {reason}");
                        self.count_failure(worker, id, by_id, reason.clone())?;
                        // A worker that cannot compute tasks is as useless as one that sends garbage.
                        self.strike(worker, &format!("could not compute a task: {reason}"));
                    } else {
                        self.strike(worker, "a failure report naming another parameter version than the task's");
                    }
                }
                Ok(self.scheduler.retry(worker, id, now))
            }
            Event::Result { worker, result, outcome, permit } => {
                if !self.scheduler.holds(worker, result.id) {
                    // Never given this task (or already returned it): forged or replayed.
                    self.reject("not_assigned");
                    tracing::warn!("worker {worker}: refused result for task {} it was not computing", result.id);
                    self.strike(worker, "a result for a task it was not computing");
                    return Ok(Vec::new());
                }
                let outcome = match outcome {
                    Ok(o) => o,
                    Err(rejection) => {
                        self.reject(rejection.reason());
                        self.last_rejection = Some(rejection.to_string());
                        tracing::warn!("worker {worker}: refused result for task {}: {rejection}", result.id);
                        if rejection.is_task_failure() && self.scheduler.in_batch(result.id) {
                            self.count_failure(worker, result.id, by_id, rejection.to_string())?;
                        }
                        self.strike(worker, &rejection.to_string());
                        return Ok(self.scheduler.retry(worker, result.id, now));
                    }
                };
                let (verdict, actions) = self.scheduler.result(worker, result.id, result.version, result.mode, now);
                match verdict {
                    Verdict::Accepted { index } => {
                        self.wire.gradients_received += result.grad_len * result.grad_dtype.size() as u64;
                        let label = if mode == Mode::Train { "train" } else { "eval" };
                        metrics::counter!("metatrain_tasks_completed_total", "mode" => label).increment(1);
                        metrics::histogram!("metatrain_task_duration_seconds", "mode" => label)
                            .record(result.compute_seconds as f64);
                        self.tasks_completed += 1;
                        let who = self.worker_label(worker);
                        metrics::counter!("metatrain_worker_results_total", "worker" => who).increment(1);
                        collector.insert(index, outcome)?;
                        // The gradient is in the sum, or parked within cluster.reorder_memory_mb, or on disk.
                        drop(permit);
                        if let Some(e) = collector.take_spill_failure() {
                            self.note_spill_failure(&e);
                        }
                    }
                    // Benign: a slower copy of a task already done, or a late copy from an earlier batch.
                    Verdict::Duplicate => self.reject("duplicate"),
                    Verdict::Stale => self.reject("stale_version"),
                    Verdict::Mismatch => {
                        let why = Rejection::WrongVersionOrMode;
                        self.reject(why.reason());
                        self.last_rejection = Some(why.to_string());
                        tracing::warn!("worker {worker}: refused result for task {}: {why}", result.id);
                        self.strike(worker, &why.to_string());
                    }
                    // Checked above.
                    Verdict::NotAssigned => self.reject("not_assigned"),
                }
                Ok(actions)
            }
        }
    }

    /// The `worker` metrics label: the worker's (authenticated) name for the first [`MAX_WORKER_LABELS`]
    /// names seen, `other` after that, so that the label's cardinality stays bounded.
    fn worker_label(&mut self, worker: WorkerId) -> String {
        let Some(name) = self.workers.get(&worker).map(|w| w.name.clone()) else { return "other".into() };
        if self.labels.contains(&name) {
            return name;
        }
        if self.labels.len() < MAX_WORKER_LABELS {
            self.labels.insert(name.clone());
            return name;
        }
        "other".into()
    }

    fn reject(&mut self, reason: &'static str) {
        self.results_rejected += 1;
        metrics::counter!("metatrain_results_rejected_total", "reason" => reason).increment(1);
    }

    /// A malformed result (or a failure) from `worker`. Strikes count per worker *name*, across its
    /// connections (reconnecting does not clear them); at [`QUARANTINE_STRIKES`] the connection is closed
    /// and the name refused for [`QUARANTINE`]; its tasks are reassigned.
    fn strike(&mut self, worker: WorkerId, why: &str) {
        let Some(w) = self.workers.get_mut(&worker) else { return };
        // Results already in flight from a connection being closed are refused, but strike no more.
        if w.quarantined {
            return;
        }
        if self.strikes.len() >= MAX_STRIKE_NAMES && !self.strikes.contains_key(&w.name) {
            // Only without authentication can names be this many; forgetting old strikes bounds memory.
            self.strikes.clear();
        }
        let n = self.strikes.entry(w.name.clone()).or_insert(0);
        *n += 1;
        if *n < QUARANTINE_STRIKES {
            return;
        }
        self.strikes.remove(&w.name);
        w.quarantined = true;
        let reason = format!(
            "quarantined for {}s after {QUARANTINE_STRIKES} malformed results (last: {why})",
            QUARANTINE.as_secs()
        );
        tracing::warn!("worker {worker} ({}) {reason}", w.name);
        self.quarantine.add(&w.name, QUARANTINE);
        metrics::counter!("metatrain_workers_quarantined_total").increment(1);
        let _ = w.outbox.send(Outbound::Disconnect(reason));
    }

    /// Records that `worker` could not compute `id`: it reported a failure, or returned non-finite
    /// numbers. A task that fails on several different workers fails deterministically (diverged
    /// training, missing data): the run stops with each worker's reason rather than retrying forever.
    /// Protocol violations (wrong shape, version or dtype) are not counted here: they say the worker is
    /// bad, not the task, and [`Self::strike`] deals with them.
    fn count_failure(
        &mut self,
        worker: WorkerId,
        id: TaskId,
        by_id: &HashMap<TaskId, TaskSpec>,
        reason: String,
    ) -> Result<(), RunError> {
        // Distinct worker *names*: one certificate reconnecting many times is still one worker.
        let Some(name) = self.workers.get(&worker).map(|w| w.name.clone()) else { return Ok(()) };
        let Some(spec) = by_id.get(&id).copied() else { return Ok(()) };
        let failed_on = self.failures.entry(id).or_default();
        failed_on.insert(name, reason);
        // Two distinct workers suffice when the run has only had two; a lone worker is never enough to
        // call a failure deterministic (it is quarantined instead, see `strike`).
        let limit = self.names_seen.len().clamp(2, MAX_TASK_FAILURES);
        if failed_on.len() >= limit {
            let workers = failed_on.len();
            let reasons = failed_on.iter().map(|(name, why)| format!("{name}: {why}")).collect::<Vec<_>>().join("; ");
            return Err(RunError::TaskKeepsFailing { id, step: spec.step, index: spec.index, workers, reasons });
        }
        Ok(())
    }
}
