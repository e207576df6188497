//! The coordinator's Prometheus metrics: names and HELP text in one place (see docs/metrics.md).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub fn describe() {
    describe_counter!("metatrain_meta_steps_total", "Meta-steps (outer updates) applied.");
    describe_counter!("metatrain_tasks_completed_total", "Task results accepted, by mode (train, eval).");
    describe_gauge!("metatrain_workers_connected", "Workers currently connected.");
    describe_counter!("metatrain_workers_joined_total", "Worker connections accepted.");
    describe_counter!("metatrain_workers_lost_total", "Worker connections ended before the run finished.");
    describe_gauge!("metatrain_meta_train_loss", "Mean post-adaptation query loss of the last meta-batch.");
    describe_gauge!("metatrain_meta_train_pre_adapt_loss", "Mean pre-adaptation query loss of the last meta-batch.");
    describe_gauge!(
        "metatrain_meta_test_loss",
        "Mean post-adaptation query loss of the last evaluation on held-out tasks."
    );
    describe_gauge!("metatrain_meta_test_pre_adapt_loss", "Mean pre-adaptation query loss of the last evaluation.");
    describe_gauge!(
        "metatrain_meta_test_accuracy",
        "Mean post-adaptation query accuracy of the last evaluation (classification)."
    );
    describe_gauge!("metatrain_meta_grad_norm", "L2 norm of the averaged meta-gradient before clipping, last step.");
    describe_counter!(
        "metatrain_meta_grad_clipped_total",
        "Meta-steps whose averaged meta-gradient was rescaled by global-norm clipping."
    );
    describe_histogram!(
        "metatrain_step_duration_seconds",
        Unit::Seconds,
        "Wall time of one meta-step (assign to update)."
    );
    describe_histogram!(
        "metatrain_task_duration_seconds",
        Unit::Seconds,
        "Worker-reported compute time per accepted task, by mode."
    );
    describe_counter!(
        "metatrain_worker_results_total",
        "Results accepted, by worker (authenticated name; the first 64 names, then `other`)."
    );
    describe_counter!("metatrain_results_rejected_total", "Task results refused, by reason.");
    describe_counter!(
        "metatrain_tasks_reassigned_total",
        "Tasks put back in the queue (worker lost, deadline missed, result refused)."
    );
    describe_counter!("metatrain_tasks_failed_total", "Tasks a worker reported it could not compute.");
    describe_counter!(
        "metatrain_tasks_duplicated_total",
        "Duplicate copies of straggling tasks handed to idle workers."
    );
    describe_counter!(
        "metatrain_workers_quarantined_total",
        "Workers disconnected and quarantined after repeated malformed results."
    );
    describe_histogram!(
        "metatrain_heartbeat_rtt_seconds",
        Unit::Seconds,
        "QUIC round-trip time to workers, sampled every 5 s per connection."
    );
    describe_counter!(
        "metatrain_gradients_spilled_total",
        "Gradients that waited for their turn in the in-order reduction on disk, beyond cluster.reorder_memory_mb."
    );
    describe_gauge!(
        "metatrain_result_streams_waiting",
        "Result streams whose payload waits for room under cluster.receive_memory_mb (their workers are held by flow control)."
    );
    describe_counter!("metatrain_sent_bytes_total", Unit::Bytes, "Parameter payload bytes sent to workers.");
    describe_counter!("metatrain_received_bytes_total", Unit::Bytes, "Result payload bytes received from workers.");
    describe_gauge!("metatrain_params_version", "Parameter version (meta-steps applied so far).");
    describe_histogram!("metatrain_checkpoint_duration_seconds", Unit::Seconds, "Time to write one checkpoint.");
    describe_gauge!(
        "metatrain_checkpoint_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last checkpoint (checkpoint age = time() - this)."
    );
    describe_gauge!("metatrain_checkpoint_step", "Meta-step of the last checkpoint.");
    describe_counter!(
        "metatrain_tasks_corrupted_total",
        "Training tasks corrupted on purpose by the [corrupt] option (counted when their step completes)."
    );
    describe_counter!(
        "metatrain_tasks_quarantined_total",
        "Training tasks left out or down-weighted as outliers, by reason (pre_loss, loss, grad_norm) and whether they were corrupted on purpose."
    );
    describe_counter!(
        "metatrain_meta_steps_skipped_total",
        "Meta-steps without an update because the defence quarantined every task."
    );
    describe_gauge!(
        "metatrain_meta_train_loss_by_difficulty",
        "Mean post-adaptation query loss of the last meta-batch's tasks in each difficulty bucket."
    );
    describe_gauge!(
        "metatrain_meta_test_loss_by_difficulty",
        "Mean post-adaptation query loss of the last evaluation's held-out tasks in each difficulty bucket."
    );
    describe_gauge!(
        "metatrain_curriculum_competence",
        "Curriculum competence in [0, 1]: the hardest task difficulty the sampler draws now (1 without a curriculum)."
    );
}

/// Every `metatrain_results_rejected_total` reason (see `aggregate::Rejection::reason` and `run`).
pub const REJECTION_REASONS: &[&str] = &[
    "not_assigned",
    "wrong_version_or_mode",
    "wrong_dtype",
    "non_finite_gradient",
    "wrong_shape",
    "non_finite_loss",
    "bad_accuracy",
    "bad_timing",
    "bad_difficulty",
    "missing_gradient",
    "unexpected_gradient",
    "malformed_frame",
    "duplicate",
    "stale_version",
];

/// Exports every counter at 0 with each of its known label values, so that dashboards and alerts see
/// 0 rather than "no data" before the first event (Prometheus practice for known label sets).
pub fn init_counters() {
    for name in [
        "metatrain_meta_steps_total",
        "metatrain_workers_joined_total",
        "metatrain_workers_lost_total",
        "metatrain_workers_quarantined_total",
        "metatrain_meta_grad_clipped_total",
        "metatrain_tasks_reassigned_total",
        "metatrain_tasks_failed_total",
        "metatrain_tasks_duplicated_total",
        "metatrain_tasks_corrupted_total",
        "metatrain_meta_steps_skipped_total",
        "metatrain_sent_bytes_total",
        "metatrain_received_bytes_total",
        "metatrain_gradients_spilled_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for mode in ["train", "eval"] {
        metrics::counter!("metatrain_tasks_completed_total", "mode" => mode).absolute(0);
    }
    for reason in REJECTION_REASONS {
        metrics::counter!("metatrain_results_rejected_total", "reason" => *reason).absolute(0);
    }
    for reason in crate::defence::Reason::ALL {
        for corrupted in ["true", "false"] {
            metrics::counter!("metatrain_tasks_quarantined_total", "reason" => reason.label(), "corrupted" => corrupted)
                .absolute(0);
        }
    }
    metrics::gauge!("metatrain_workers_connected").set(0.0);
    // Until the first step sets it from the curriculum: every task is eligible.
    metrics::gauge!("metatrain_curriculum_competence").set(1.0);
}

#[cfg(test)]
mod tests {
    use super::REJECTION_REASONS;
    use crate::aggregate::Rejection;
    use metatrain_common::tensor::{Dtype, TensorError};

    #[test]
    fn every_rejection_reason_is_initialised() {
        let all = [
            Rejection::NonFiniteLoss,
            Rejection::BadAccuracy,
            Rejection::BadTiming,
            Rejection::BadDifficulty,
            Rejection::Gradient(TensorError::NonFinite { index: 0, value: f32::NAN }),
            Rejection::Gradient(TensorError::WrongLength { expected: 2, got: 1 }),
            Rejection::Gradient(TensorError::Ragged { bytes: 3, dtype: Dtype::F32 }),
            Rejection::MissingGradient,
            Rejection::UnexpectedGradient,
            Rejection::WrongVersionOrMode,
            Rejection::WrongDtype { got: Dtype::Bf16, want: Dtype::F32 },
        ];
        for r in all {
            // A new variant must be added here (the match is exhaustive) and to REJECTION_REASONS.
            match r {
                Rejection::NonFiniteLoss
                | Rejection::BadAccuracy
                | Rejection::BadTiming
                | Rejection::BadDifficulty
                | Rejection::Gradient(_)
                | Rejection::MissingGradient
                | Rejection::UnexpectedGradient
                | Rejection::WrongVersionOrMode
                | Rejection::WrongDtype { .. } => {}
            }
            assert!(REJECTION_REASONS.contains(&r.reason()), "{} missing", r.reason());
        }
    }
}
