//! What every benchmark prints and keeps: one table (markdown on stdout, and `target/bench/<name>.json`
//! with each figure's unit), the goals it is held to, each met or missed, and the machine's core count.

use serde_json::{Value, json};

/// One cell of a table: a label, or a figure shown with `decimals` digits (kept exact in the JSON) in its
/// column's unit, or a ratio of two such figures (no unit, whatever the column's).
pub enum Cell {
    Text(String),
    Figure { value: f64, decimals: usize },
    Ratio { value: f64, decimals: usize },
}

pub fn text(text: impl Into<String>) -> Cell {
    Cell::Text(text.into())
}

pub fn figure(value: f64, decimals: usize) -> Cell {
    Cell::Figure { value, decimals }
}

pub fn ratio(value: f64, decimals: usize) -> Cell {
    Cell::Ratio { value, decimals }
}

struct Goal {
    what: String,
    measured: f64,
    limit: f64,
    unit: &'static str,
    at_most: bool,
}

impl Goal {
    fn met(&self) -> bool {
        if self.at_most {
            self.measured <= self.limit
        } else {
            self.measured >= self.limit
        }
    }
}

pub struct Report {
    name: &'static str,
    command: String,
    columns: Vec<(&'static str, &'static str)>,
    rows: Vec<Vec<Cell>>,
    goals: Vec<Goal>,
    notes: Vec<String>,
}

impl Report {
    /// A report for `cargo xtask bench <name> <args>` whose table has these (column, unit) headings; the
    /// names are the JSON's keys, so no two may be the same.
    pub fn new(name: &'static str, args: &[String], columns: &[(&'static str, &'static str)]) -> Self {
        for (i, (column, _)) in columns.iter().enumerate() {
            assert!(
                !columns[..i].iter().any(|(other, _)| other == column),
                "bench {name}: two columns named {column}"
            );
        }
        let command = format!("cargo xtask bench {name} {}", args.join(" "))
            .trim()
            .to_string();
        Self {
            name,
            command,
            columns: columns.to_vec(),
            rows: Vec::new(),
            goals: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        assert_eq!(cells.len(), self.columns.len(), "a row of {}", self.name);
        self.rows.push(cells);
    }

    /// A goal the figure must not exceed.
    pub fn at_most(&mut self, what: impl Into<String>, measured: f64, limit: f64, unit: &'static str) {
        self.goal(what.into(), measured, limit, unit, true);
    }

    /// A goal the figure must reach.
    pub fn at_least(&mut self, what: impl Into<String>, measured: f64, limit: f64, unit: &'static str) {
        self.goal(what.into(), measured, limit, unit, false);
    }

    fn goal(&mut self, what: String, measured: f64, limit: f64, unit: &'static str, at_most: bool) {
        self.goals.push(Goal {
            what,
            measured,
            limit,
            unit,
            at_most,
        });
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Prints the table and the goals, writes the JSON; true when every goal is met.
    pub fn finish(self) -> anyhow::Result<bool> {
        let heading = |(name, unit): &(&str, &str)| {
            if unit.is_empty() {
                name.to_string()
            } else {
                format!("{name} ({unit})")
            }
        };
        println!("\n`{}`\n", self.command);
        println!(
            "| {} |",
            self.columns.iter().map(heading).collect::<Vec<_>>().join(" | ")
        );
        println!("|{}", "---|".repeat(self.columns.len()));
        for row in &self.rows {
            let cells: Vec<String> = row
                .iter()
                .map(|cell| match cell {
                    Cell::Text(text) => text.clone(),
                    Cell::Figure { value, decimals } | Cell::Ratio { value, decimals } if value.is_finite() => {
                        format!("{value:.decimals$}")
                    }
                    Cell::Figure { .. } | Cell::Ratio { .. } => "—".to_string(),
                })
                .collect();
            println!("| {} |", cells.join(" | "));
        }
        println!();
        for goal in &self.goals {
            let with_unit = |value: String| format!("{value} {}", goal.unit).trim_end().to_string();
            println!(
                "{} {}: {} (goal {} {})",
                if goal.met() { "met   " } else { "MISSED" },
                goal.what,
                with_unit(format!("{:.3}", goal.measured)),
                if goal.at_most { "<=" } else { ">=" },
                with_unit(goal.limit.to_string()),
            );
        }
        for note in &self.notes {
            println!("note: {note}");
        }
        let all_met = self.goals.iter().all(Goal::met);
        let json = self.to_json();
        let dir = crate::root().join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.json", self.name));
        std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
        println!("written: {}", path.display());
        Ok(all_met)
    }

    fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                let cells: serde_json::Map<String, Value> = self
                    .columns
                    .iter()
                    .zip(row)
                    .map(|((name, unit), cell)| {
                        let value = match cell {
                            Cell::Text(text) => json!(text),
                            Cell::Figure { value, .. } => json!({"value": finite(*value), "unit": unit}),
                            Cell::Ratio { value, .. } => json!({"value": finite(*value), "unit": "ratio"}),
                        };
                        (name.to_string(), value)
                    })
                    .collect();
                Value::Object(cells)
            })
            .collect();
        let goals: Vec<Value> = self
            .goals
            .iter()
            .map(|g| {
                json!({
                    "goal": g.what,
                    "measured": g.measured,
                    "limit": g.limit,
                    "unit": g.unit,
                    "comparison": if g.at_most { "at most" } else { "at least" },
                    "met": g.met(),
                })
            })
            .collect();
        json!({
            "bench": self.name,
            "command": self.command,
            "cores": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
            "measured_at_unix": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            "rows": rows,
            "goals": goals,
            "notes": self.notes,
        })
    }
}

/// JSON has no NaN or infinity: a figure that could not be measured is null.
fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "two columns named CPU")]
    fn two_columns_cannot_share_a_name_as_the_json_keys_them_by_name() {
        Report::new("t", &[], &[("CPU", "%"), ("CPU", "s per hour")]);
    }

    #[test]
    fn goals_are_met_or_missed_by_their_direction() {
        let mut report = Report::new("t", &[], &[("what", ""), ("time", "s")]);
        report.at_most("fast enough", 9.0, 10.0, "s");
        report.at_least("enough agents", 10_000.0, 10_000.0, "agents");
        assert!(report.goals.iter().all(Goal::met));
        report.at_most("small enough", 33.0, 32.0, "KB");
        assert!(!report.goals[2].met());
    }

    #[test]
    fn the_json_keeps_each_figure_with_its_unit_and_each_goal() {
        let mut report = Report::new("t", &["--secs".into(), "5".into()], &[("what", ""), ("time", "s")]);
        report.row(vec![text("ebb"), figure(1.5, 1)]);
        report.row(vec![text("peer"), figure(f64::NAN, 1)]);
        report.row(vec![text("ebb / peer"), ratio(0.5, 2)]);
        report.at_most("fast enough", 1.5, 10.0, "s");
        let json = report.to_json();
        assert_eq!(json["command"], "cargo xtask bench t --secs 5");
        assert_eq!(json["rows"][0]["what"], "ebb");
        assert_eq!(json["rows"][0]["time"], json!({"value": 1.5, "unit": "s"}));
        assert_eq!(
            json["rows"][1]["time"]["value"],
            Value::Null,
            "a figure not measured is null"
        );
        assert_eq!(
            json["rows"][2]["time"],
            json!({"value": 0.5, "unit": "ratio"}),
            "a ratio has no unit of its column"
        );
        assert_eq!(json["goals"][0]["met"], true);
        assert!(json["cores"].as_u64().unwrap() >= 1);
    }
}
