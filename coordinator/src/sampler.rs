//! Which tasks each meta-step and each evaluation uses: a pure function of (seed, step), so a run's task
//! sequence never depends on timing or on the workers. (The curriculum schedule will plug in here.)

use metatrain_common::task::{Split, TaskSpec, FINAL_EVAL_STEP};

/// The meta-batch of training step `step`.
pub fn train_batch(seed: u64, step: u64, meta_batch: usize) -> Vec<TaskSpec> {
    (0..meta_batch as u32).map(|index| TaskSpec { seed, split: Split::Train, step, index }).collect()
}

/// Held-out tasks for the periodic evaluation after `step`. The same `tasks` held-out tasks are used at
/// every periodic evaluation, so curves compare like with like.
pub fn eval_batch(seed: u64, tasks: usize) -> Vec<TaskSpec> {
    (0..tasks as u32).map(|index| TaskSpec { seed, split: Split::Eval, step: 0, index }).collect()
}

/// The final evaluation's held-out tasks (the report's figures).
pub fn final_eval_batch(seed: u64, tasks: usize) -> Vec<TaskSpec> {
    (0..tasks as u32).map(|index| TaskSpec { seed, split: Split::Eval, step: FINAL_EVAL_STEP, index }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_indexed_and_disjoint() {
        let a = train_batch(1, 5, 3);
        assert_eq!(a.iter().map(|s| s.index).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(a.iter().all(|s| s.step == 5 && s.split == Split::Train));
        let e = eval_batch(1, 4);
        let f = final_eval_batch(1, 4);
        assert!(e.iter().all(|s| s.split == Split::Eval));
        assert!(e.iter().zip(&f).all(|(x, y)| x != y));
    }
}
