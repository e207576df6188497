//! Which tasks each meta-step and each evaluation uses: a pure function of (seed, step) and the
//! curriculum's competence for that step ([`crate::curriculum`]), so a run's task sequence never depends
//! on timing or on the workers. Held-out tasks are always drawn from the whole distribution (competence
//! 1): they measure what the run is for, not what the curriculum allows so far.

use metatrain_common::task::{Competence, Split, TaskSpec, FINAL_EVAL_STEP};

/// The meta-batch of training step `step`, its tasks' difficulty capped at `competence`.
pub fn train_batch(seed: u64, step: u64, meta_batch: usize, competence: Competence) -> Vec<TaskSpec> {
    (0..meta_batch as u32)
        .map(|index| TaskSpec { competence, ..TaskSpec::new(seed, Split::Train, step, index) })
        .collect()
}

/// Held-out tasks for the periodic evaluation after `step`. The same `tasks` held-out tasks are used at
/// every periodic evaluation, so curves compare like with like.
pub fn eval_batch(seed: u64, tasks: usize) -> Vec<TaskSpec> {
    (0..tasks as u32).map(|index| TaskSpec::new(seed, Split::Eval, 0, index)).collect()
}

/// The final evaluation's held-out tasks (the report's figures).
pub fn final_eval_batch(seed: u64, tasks: usize) -> Vec<TaskSpec> {
    (0..tasks as u32).map(|index| TaskSpec::new(seed, Split::Eval, FINAL_EVAL_STEP, index)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_indexed_and_disjoint() {
        let a = train_batch(1, 5, 3, Competence::FULL);
        assert_eq!(a.iter().map(|s| s.index).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(a.iter().all(|s| s.step == 5 && s.split == Split::Train));
        let capped = train_batch(1, 5, 3, Competence::from_fraction(0.3));
        assert!(capped.iter().all(|s| s.competence.fraction() == 0.3));
        let e = eval_batch(1, 4);
        let f = final_eval_batch(1, 4);
        assert!(e.iter().all(|s| s.split == Split::Eval && s.competence == Competence::FULL));
        assert!(e.iter().zip(&f).all(|(x, y)| x != y));
    }
}
