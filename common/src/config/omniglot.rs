//! `task.distribution = "omniglot"`: N-way K-shot episodes from the real Omniglot characters, with MAML's
//! options: rotation augmentation (`task.rotations`) and MAML's split of the merged characters
//! (`task.split = "maml"`). The defaults are the standard split without augmentation, and draw the same
//! episodes, bit for bit, as before these options existed.

use serde::{Deserialize, Serialize};

use super::{
    default_k_shot, default_n_way, default_q_query, invalid, ConfigError, ModelKind, MAX_EPISODE_IMAGES,
    OMNIGLOT_MIN_SPLIT_CHARACTERS,
};
use crate::omniglot::classes::ROTATIONS;
use crate::omniglot::split::{MAML_TRAIN_CHARACTERS, OMNIGLOT_CHARACTERS};
use crate::omniglot::DRAWERS;

/// Characters of the standard background (meta-training) split.
pub const OMNIGLOT_BACKGROUND_CHARACTERS: usize = 964;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OmniglotTaskConfig {
    /// Classes per episode (N). Default 5. At most the held-out classes (see [`OmniglotTaskConfig::classes`]).
    #[serde(default = "default_n_way")]
    pub n_way: usize,
    /// Support images per class (K). Default 1.
    #[serde(default = "default_k_shot")]
    pub k_shot: usize,
    /// Query images per class (Q). Default 15. K + Q must be at most 20 (drawers per character).
    #[serde(default = "default_q_query")]
    pub q_query: usize,
    /// Rotation augmentation, as in MAML: every character is four classes, its drawings rotated by 0°, 90°,
    /// 180° and 270° counter-clockwise (an exact pixel permutation); an episode's classes are distinct
    /// (character, rotation) pairs, and every image of a class has the class's rotation. Applies to both
    /// meta-training and held-out classes. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub rotations: bool,
    /// Which characters are meta-training and which are held out: `"standard"` (default: the background
    /// split's 964 characters for meta-training, the evaluation split's 659 held out) or `"maml"` (MAML's:
    /// both splits merged, 1,200 characters for meta-training and the other 423 held out, chosen by a keyed
    /// shuffle with a fixed key, so the same for every run, seed and machine; see
    /// [`crate::omniglot::split`]).
    #[serde(default = "default_split", skip_serializing_if = "is_standard")]
    pub split: String,
}

/// The splits `task.split` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OmniglotSplit {
    /// Background split for meta-training, evaluation split held out.
    Standard,
    /// Both merged; 1,200 characters for meta-training, 423 held out ([`crate::omniglot::split`]).
    Maml,
}

impl OmniglotSplit {
    /// Every split with its config name.
    pub const ALL: [(OmniglotSplit, &'static str); 2] =
        [(OmniglotSplit::Standard, "standard"), (OmniglotSplit::Maml, "maml")];

    /// The split `name` names, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(s, _)| *s)
    }

    /// The config name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(s, _)| *s == self).map_or("standard", |(_, n)| n)
    }
}

fn default_split() -> String {
    OmniglotSplit::Standard.name().to_string()
}
fn is_standard(split: &str) -> bool {
    split == OmniglotSplit::Standard.name()
}
fn is_false(b: &bool) -> bool {
    !*b
}

impl Default for OmniglotTaskConfig {
    fn default() -> Self {
        OmniglotTaskConfig {
            n_way: default_n_way(),
            k_shot: default_k_shot(),
            q_query: default_q_query(),
            rotations: false,
            split: default_split(),
        }
    }
}

impl OmniglotTaskConfig {
    /// The configured split; `None` for a name [`OmniglotTaskConfig::validate`] refuses.
    pub fn split(&self) -> Option<OmniglotSplit> {
        OmniglotSplit::from_name(&self.split)
    }

    /// Classes (meta-training, held out) on the real data with these options: characters, times four with
    /// rotations. Standard: 964 / 659 (3,856 / 2,636 rotated); maml: 1,200 / 423 (4,800 / 1,692).
    pub fn classes(&self) -> (usize, usize) {
        let (train, held_out) = match self.split() {
            Some(OmniglotSplit::Maml) => (MAML_TRAIN_CHARACTERS, OMNIGLOT_CHARACTERS - MAML_TRAIN_CHARACTERS),
            _ => (OMNIGLOT_BACKGROUND_CHARACTERS, OMNIGLOT_MIN_SPLIT_CHARACTERS),
        };
        let per_char = if self.rotations { ROTATIONS } else { 1 };
        (train * per_char, held_out * per_char)
    }

    /// Checks the fields (`model` is the run's model, which must take images).
    pub fn validate(&self, model: ModelKind) -> Result<(), ConfigError> {
        let Some(split) = self.split() else {
            return Err(invalid(
                "task.split",
                format!(
                    "must be \"standard\" (background characters for meta-training, evaluation ones held out) or \"maml\" (both merged: {MAML_TRAIN_CHARACTERS} for meta-training, the other {} held out), got {:?}",
                    OMNIGLOT_CHARACTERS - MAML_TRAIN_CHARACTERS,
                    self.split
                ),
            ));
        };
        let (_, held_out) = self.classes();
        if !(2..=held_out).contains(&self.n_way) {
            let what = match (split, self.rotations) {
                (OmniglotSplit::Standard, false) => {
                    format!("Omniglot's evaluation split has {OMNIGLOT_MIN_SPLIT_CHARACTERS} characters")
                }
                (OmniglotSplit::Standard, true) => format!(
                    "Omniglot's evaluation split has {OMNIGLOT_MIN_SPLIT_CHARACTERS} characters, {held_out} classes with rotations"
                ),
                (OmniglotSplit::Maml, false) => format!("the maml split holds out {held_out} characters"),
                (OmniglotSplit::Maml, true) => format!(
                    "the maml split holds out {} characters, {held_out} classes with rotations",
                    held_out / ROTATIONS
                ),
            };
            return Err(invalid("task.n_way", format!("must be in 2..={held_out} ({what}), got {}", self.n_way)));
        }
        if self.k_shot == 0 || self.q_query == 0 || self.k_shot.saturating_add(self.q_query) > DRAWERS {
            return Err(invalid(
                "task.k_shot",
                format!(
                    "k_shot ≥ 1, q_query ≥ 1 and k_shot + q_query ≤ {DRAWERS} (Omniglot has {DRAWERS} drawings per character); got {} + {}",
                    self.k_shot, self.q_query
                ),
            ));
        }
        let images = self.n_way * (self.k_shot + self.q_query);
        if images > MAX_EPISODE_IMAGES {
            return Err(invalid(
                "task.n_way",
                format!(
                    "an episode of {} classes × {} images is {images} images, more than the {MAX_EPISODE_IMAGES} allowed",
                    self.n_way,
                    self.k_shot + self.q_query
                ),
            ));
        }
        if model != ModelKind::Conv4 {
            return Err(invalid("model.name", "omniglot tasks take model \"conv4\""));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, TaskConfig};
    use super::*;

    fn omniglot(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("[task]\ndistribution = \"omniglot\"\n{extra}\n[model]\nname = \"conv4\"\n"))
    }

    #[test]
    fn defaults_are_the_standard_split_without_rotations_and_serialise_as_before() {
        let c = omniglot("").unwrap();
        let TaskConfig::Omniglot(o) = &c.task else { panic!() };
        assert_eq!(*o, OmniglotTaskConfig::default());
        assert_eq!((o.split(), o.rotations, o.classes()), (Some(OmniglotSplit::Standard), false, (964, 659)));
        // Unchanged TOML for runs without the new options (reports, checkpoints, workers' Welcome).
        assert!(!c.to_toml().contains("rotations") && !c.to_toml().contains("split"), "{}", c.to_toml());
        let m = omniglot("split = \"maml\"\nrotations = true").unwrap();
        assert!(m.to_toml().contains("split = \"maml\"") && m.to_toml().contains("rotations = true"));
        assert_eq!(Config::from_toml(&m.to_toml()).unwrap(), m);
    }

    #[test]
    fn class_counts_follow_the_options() {
        for (extra, classes) in [
            ("rotations = true", (3856, 2636)),
            ("split = \"maml\"", (1200, 423)),
            ("split = \"maml\"\nrotations = true", (4800, 1692)),
        ] {
            let c = omniglot(extra).unwrap();
            let TaskConfig::Omniglot(o) = &c.task else { panic!() };
            assert_eq!(o.classes(), classes, "{extra}");
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        for (extra, field, says) in [
            ("split = \"mini\"", "task.split", "\"mini\""),
            ("split = \"MAML\"", "task.split", "\"maml\""),
            ("split = \"maml\"\nn_way = 424", "task.n_way", "423"),
            ("split = \"maml\"\nrotations = true\nn_way = 1693", "task.n_way", "1692"),
            ("rotations = true\nn_way = 2637", "task.n_way", "2636"),
            ("n_way = 1", "task.n_way", "2..=659"),
            ("rotations = true\nn_way = 2001\nk_shot = 5\nq_query = 5", "task.n_way", "20000"),
            ("k_shot = 10\nq_query = 11", "task.k_shot", "≤ 20"),
        ] {
            let e = omniglot(extra).unwrap_err();
            let text = e.to_string();
            assert!(matches!(&e, ConfigError::Invalid { field: f, .. } if f == field), "{extra}: {text}");
            assert!(text.contains(says), "{extra}: {text}");
        }
        assert!(omniglot("split = \"maml\"\nn_way = 423").is_ok());
        assert!(omniglot("split = \"maml\"\nrotations = true\nn_way = 1692\nk_shot = 1\nq_query = 1").is_ok());
        assert!(omniglot("rotations = yes").is_err(), "not a boolean");
    }

    #[test]
    fn the_example_configs_are_maml_split_with_rotations() {
        for (text, n_way, inner_steps) in [
            (include_str!("../../../configs/omniglot-maml-5w1s.toml"), 5, 1),
            (include_str!("../../../configs/omniglot-maml-20w1s.toml"), 20, 5),
        ] {
            let c = Config::from_toml(text).unwrap();
            let TaskConfig::Omniglot(o) = &c.task else { panic!("an omniglot config") };
            assert_eq!((o.split(), o.rotations, o.n_way, o.k_shot), (Some(OmniglotSplit::Maml), true, n_way, 1));
            assert_eq!(o.classes(), (4800, 1692));
            assert_eq!(c.algo.inner_steps, inner_steps);
        }
    }
}
