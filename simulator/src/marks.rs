//! Faults and reshards as they happen during a run, for the live view
//! (`live.rs`): the fault and reshard schedules open and close marks, and
//! the live charts shade them.

use std::sync::Arc;

use serde::Serialize;

/// A fault or a reshard as it happens, shaded on the live charts: seconds
/// since the load began; `to_s` is `None` while it lasts.
#[derive(Debug, Clone, Serialize)]
pub struct Mark {
    pub name: String,
    /// `fault` or `reshard`.
    pub kind: &'static str,
    pub from_s: f64,
    pub to_s: Option<f64>,
}

/// The marks of a run, shared by whatever makes them (the fault schedule,
/// the reshard schedule) and the live view.
#[derive(Debug, Clone, Default)]
pub struct Marks(Arc<std::sync::Mutex<Vec<Mark>>>);

impl Marks {
    /// Opens a mark; answers its index, for [`Marks::end`].
    pub fn begin(&self, kind: &'static str, name: &str, from_s: f64) -> usize {
        let mut marks = self.0.lock().expect("marks lock");
        marks.push(Mark {
            name: name.to_string(),
            kind,
            from_s,
            to_s: None,
        });
        marks.len() - 1
    }

    pub fn end(&self, index: usize, to_s: f64) {
        if let Some(mark) = self.0.lock().expect("marks lock").get_mut(index) {
            mark.to_s = Some(to_s);
        }
    }

    pub fn all(&self) -> Vec<Mark> {
        self.0.lock().expect("marks lock").clone()
    }
}
