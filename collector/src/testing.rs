//! Group configurations for tests and benchmarks, written in one place: [`GroupToml`] builds the TOML of one
//! `[[groups]]` entry, so a test states only what it changes. Not used by the collector itself.

use std::fmt::Write as _;
use std::path::Path;

/// One `[[groups]]` entry of a configuration file, with its provider and load balancer tables.
#[derive(Debug, Clone)]
pub struct GroupToml {
    keys: Vec<(String, toml::Value)>,
    provider: Vec<(String, toml::Value)>,
    load_balancer: Vec<(String, toml::Value)>,
    /// Further tables (policies, health check, hooks, schedules), verbatim.
    tables: Vec<String>,
}

impl GroupToml {
    /// A group of local instances (`min_size` 0, `max_size` 3) behind the built-in load balancer on a free
    /// loopback port.
    pub fn local(name: &str) -> Self {
        GroupToml {
            keys: Vec::new(),
            provider: vec![("type".into(), "local".into())],
            load_balancer: vec![
                ("type".into(), "builtin".into()),
                ("listen".into(), "127.0.0.1:0".into()),
            ],
            tables: Vec::new(),
        }
        .set("name", name)
        .set("min_size", 0)
        .set("max_size", 3)
    }

    /// A group on the directory-backed fake cloud in `dir` (`providers::fake::dir`), otherwise as [`Self::local`];
    /// only a collector built with the `fake-cloud` feature reads it.
    pub fn fake(name: &str, dir: &Path) -> Self {
        Self::local(name)
            .provider_type("fake")
            .provider("dir", dir.display().to_string())
    }

    /// The provider table replaced by one of `kind` (`aws`, `cloudstack`, `openstack`, `qemu`, ...).
    pub fn provider_type(mut self, kind: &str) -> Self {
        self.provider = vec![("type".into(), kind.into())];
        self
    }

    /// The load balancer table replaced by one of `kind` (`aws_target_group`, `octavia`, ...).
    pub fn load_balancer_type(mut self, kind: &str) -> Self {
        self.load_balancer = vec![("type".into(), kind.into())];
        self
    }

    /// Sets one of the group's own keys (`min_size`, `cooldown_secs`, ...), replacing an earlier value.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        put(&mut self.keys, key, value.into());
        self
    }

    /// Sets a key of `[groups.provider]`.
    pub fn provider(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        put(&mut self.provider, key, value.into());
        self
    }

    /// Sets a key of `[groups.load_balancer]`.
    pub fn load_balancer(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        put(&mut self.load_balancer, key, value.into());
        self
    }

    /// Adds a table after the group's own, verbatim: `[[groups.policies]]`, `[groups.health_check]`, ...
    pub fn table(mut self, toml: &str) -> Self {
        self.tables.push(toml.trim().to_string());
        self
    }

    /// A step policy on CPU over 10 s periods: `comparison` (`gt`, `lt`) `threshold`, then `adjustment`.
    pub fn cpu_policy(self, name: &str, comparison: &str, threshold: f64, adjustment: i32) -> Self {
        self.table(&format!(
            "[[groups.policies]]\nname = \"{name}\"\nmetric = \"cpu\"\nperiod_secs = 10\n\
             comparison = \"{comparison}\"\nthreshold = {threshold:?}\nadjustment = {adjustment}"
        ))
    }

    pub fn to_toml(&self) -> String {
        let mut text = String::from("[[groups]]\n");
        write_keys(&mut text, &self.keys);
        text.push_str("[groups.provider]\n");
        write_keys(&mut text, &self.provider);
        text.push_str("[groups.load_balancer]\n");
        write_keys(&mut text, &self.load_balancer);
        for table in &self.tables {
            let _ = writeln!(text, "{table}");
        }
        text
    }
}

fn put(keys: &mut Vec<(String, toml::Value)>, key: &str, value: toml::Value) {
    match keys.iter_mut().find(|(k, _)| k == key) {
        Some((_, old)) => *old = value,
        None => keys.push((key.to_string(), value)),
    }
}

fn write_keys(text: &mut String, keys: &[(String, toml::Value)]) {
    for (key, value) in keys {
        let _ = writeln!(text, "{key} = {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_group_parses_as_written() {
        let text = GroupToml::local("web")
            .set("max_size", 5)
            .set("cooldown_secs", 0)
            .set("dry_run", true)
            .provider("agent_path", "/bin/true")
            .cpu_policy("cpu-low", "lt", 20.0, -1)
            .to_toml();
        let config = crate::config::parse(Path::new("t.toml"), &text).unwrap();
        let group = &config.groups[0];
        assert_eq!((group.name.as_str(), group.min_size, group.max_size), ("web", 0, 5));
        assert!(group.dry_run);
        assert_eq!(group.engine().policies.len(), 1);
        assert_eq!(
            text.matches("max_size").count(),
            1,
            "a key set twice is written once:\n{text}"
        );
    }

    #[test]
    fn values_are_quoted_as_toml() {
        let dir = Path::new("/tmp/a \"b\" \\c");
        let text = GroupToml::fake("db", dir).to_toml();
        let config = crate::config::parse(Path::new("t.toml"), &text).unwrap();
        let crate::config::ProviderConfig::Fake(fake) = &config.groups[0].provider else {
            panic!("not the fake cloud:\n{text}");
        };
        assert_eq!(fake.dir, dir);
    }
}
