//! The AWS shared config and credentials files (`~/.aws/config`,
//! `~/.aws/credentials`) for `s3://` URLs: object_store's S3 builder reads
//! the environment only, and users keep their keys, region and endpoint in a
//! profile.
//!
//! Why by hand: these files are not plain INI (a `[profile NAME]` header in
//! one file and `[NAME]` in the other, and indented sub-settings such as
//! `s3 =` / `  endpoint_url = ...`), and the one complete reader is the AWS
//! SDK's `aws-config`, which brings a second HTTP stack and its own runtime.
//! What is read is the part of the format the S3 client can use.
//!
//! Precedence, as the AWS CLI has it: the environment, then the profile, and
//! `storage.options` over both (applied after this). Credentials come whole
//! from one place: an `AWS_ACCESS_KEY_ID` in the environment means no key of
//! the profile is used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use object_store::aws::AmazonS3ConfigKey;

/// One profile's settings: top-level keys, and `service.key` for the keys
/// indented under a `service =` line.
type Section = BTreeMap<String, String>;

/// The sections of one file by name, `[profile x]` headers under `x`.
fn parse(text: &str, config_file: bool) -> BTreeMap<String, Section> {
    let mut sections: BTreeMap<String, Section> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut parent: Option<String> = None;
    for raw in text.lines() {
        let line = raw.trim_end();
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') || body.starts_with(';') {
            continue;
        }
        // A header may end with a comment (`[profile lab] # test`), as botocore and the SDKs allow.
        let header = body
            .strip_prefix('[')
            .and_then(|h| h.split_once(']'))
            .and_then(|(h, after)| {
                let after = after.trim();
                (after.is_empty() || after.starts_with('#') || after.starts_with(';')).then_some(h)
            });
        if let Some(header) = header {
            let header = header.trim();
            // The config file names profiles `[profile x]` (and may write `[default]`);
            // other headers there (`[sso-session x]`, `[services x]`) are not profiles.
            let name = if config_file {
                match header.strip_prefix("profile ") {
                    Some(name) => Some(name.trim().to_string()),
                    None if header == "default" => Some(header.to_string()),
                    None => None,
                }
            } else {
                Some(header.to_string())
            };
            current = name;
            parent = None;
            continue;
        }
        let Some(section) = &current else { continue };
        let Some((key, value)) = body.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim().to_ascii_lowercase(), value.trim().to_string());
        let indented = line.len() != body.len();
        let entry = sections.entry(section.clone()).or_default();
        match (&parent, indented) {
            (Some(p), true) => {
                entry.insert(format!("{p}.{key}"), value);
            }
            _ if value.is_empty() => parent = Some(key),
            _ => {
                parent = None;
                entry.insert(key, value);
            }
        }
    }
    sections
}

/// Where the files are: `AWS_CONFIG_FILE` / `AWS_SHARED_CREDENTIALS_FILE`, else under `~/.aws`.
fn files(env: &dyn Fn(&str) -> Option<String>) -> (Option<PathBuf>, Option<PathBuf>) {
    let home = env("HOME").map(PathBuf::from);
    let at = |var: &str, name: &str| {
        env(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
    };
    (
        at("AWS_CONFIG_FILE", "config"),
        at("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
    )
}

/// The S3 client settings the profile adds to what the environment sets.
///
/// `env` reads an environment variable and `read` a file (None when it does
/// not exist; an unreadable one is an error naming it), so that tests need not
/// touch the process's own. An
/// `AWS_PROFILE` that neither file holds is an error naming both files; the
/// default profile may be absent.
pub fn settings(
    env: &dyn Fn(&str) -> Option<String>,
    read: &dyn Fn(&Path) -> Result<Option<String>, String>,
) -> Result<Vec<(AmazonS3ConfigKey, String)>, String> {
    let set = |var: &str| env(var).is_some_and(|v| !v.is_empty());
    let named = env("AWS_PROFILE")
        .or_else(|| env("AWS_DEFAULT_PROFILE"))
        .filter(|p| !p.is_empty());
    let profile = named.clone().unwrap_or_else(|| "default".to_string());
    let (config_path, credentials_path) = files(env);
    let load = |path: &Option<PathBuf>, config_file: bool| -> Result<Option<Section>, String> {
        let Some(path) = path else { return Ok(None) };
        Ok(read(path)?.and_then(|text| parse(&text, config_file).remove(&profile)))
    };
    let config = load(&config_path, true)?;
    let credentials = load(&credentials_path, false)?;
    if config.is_none() && credentials.is_none() {
        return match named {
            Some(p) => Err(format!(
                "AWS_PROFILE={p}: no [{p}] in {} and no [profile {p}] in {}",
                show(&credentials_path),
                show(&config_path)
            )),
            None => Ok(Vec::new()),
        };
    }
    // The credentials file wins over the config file, key by key.
    let get = |key: &str| {
        credentials
            .as_ref()
            .and_then(|s| s.get(key))
            .or_else(|| config.as_ref().and_then(|s| s.get(key)))
            .cloned()
    };
    let mut out = Vec::new();
    if !set("AWS_ACCESS_KEY_ID") && !set("AWS_SECRET_ACCESS_KEY") {
        if let (Some(id), Some(secret)) = (get("aws_access_key_id"), get("aws_secret_access_key")) {
            out.push((AmazonS3ConfigKey::AccessKeyId, id));
            out.push((AmazonS3ConfigKey::SecretAccessKey, secret));
            if let Some(token) = get("aws_session_token") {
                out.push((AmazonS3ConfigKey::Token, token));
            }
        } else if !set("AWS_WEB_IDENTITY_TOKEN_FILE") {
            if let (Some(role), Some(file)) = (get("role_arn"), get("web_identity_token_file")) {
                out.push((AmazonS3ConfigKey::RoleArn, role));
                out.push((AmazonS3ConfigKey::WebIdentityTokenFile, file));
                if let Some(name) = get("role_session_name") {
                    out.push((AmazonS3ConfigKey::RoleSessionName, name));
                }
            } else if let Some(key) = ["credential_process", "source_profile", "sso_session", "sso_start_url"]
                .into_iter()
                .find(|k| get(k).is_some())
            {
                tracing::warn!(
                    "AWS profile {profile}: `{key}` is not supported here; set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY (for example from `aws configure export-credentials`)"
                );
            }
        }
    }
    if !set("AWS_REGION") && !set("AWS_DEFAULT_REGION") {
        if let Some(region) = get("region") {
            out.push((AmazonS3ConfigKey::Region, region));
        }
    }
    let endpoint_in_env = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .any(|v| set(v));
    let ignore_files = env("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if !endpoint_in_env && !ignore_files {
        if let Some(url) = get("s3.endpoint_url").or_else(|| get("endpoint_url")) {
            out.push((AmazonS3ConfigKey::Endpoint, url));
        }
    }
    Ok(out)
}

fn show(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or_else(|| "(no HOME)".to_string(), |p| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const CONFIG: &str = "\
[default]
region = eu-west-1

[profile lab]
region = us-east-2 ; not a comment in AWS's format either, kept whole
s3 =
  endpoint_url = http://127.0.0.1:9000
  addressing_style = path
output = json

[sso-session corp]
region = ap-south-1

[profile sso]
sso_session = corp
";
    const CREDENTIALS: &str = "\
# keys
[default]
aws_access_key_id = AKDEFAULT
aws_secret_access_key = secret-default

[lab] # a header's comment (its keys would fall into [default] if the header were missed)
aws_access_key_id=AKLAB
aws_secret_access_key=secret-lab
aws_session_token=token-lab
";

    fn run(vars: &[(&str, &str)]) -> Result<Vec<(String, String)>, String> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let env = |k: &str| vars.get(k).cloned();
        let read = |p: &Path| match p.to_str() {
            Some("/home/u/.aws/config") => Ok(Some(CONFIG.to_string())),
            Some("/home/u/.aws/credentials") => Ok(Some(CREDENTIALS.to_string())),
            Some("/locked/credentials") => Err("/locked/credentials: permission denied".to_string()),
            _ => Ok(None),
        };
        settings(&env, &read).map(|s| s.into_iter().map(|(k, v)| (k.as_ref().to_string(), v)).collect())
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_default_profile_gives_keys_and_region() {
        assert_eq!(
            run(&[("HOME", "/home/u")]).unwrap(),
            pairs(&[
                ("aws_access_key_id", "AKDEFAULT"),
                ("aws_secret_access_key", "secret-default"),
                ("aws_region", "eu-west-1"),
            ])
        );
    }

    #[test]
    fn a_named_profile_reads_both_files_and_the_nested_s3_endpoint() {
        assert_eq!(
            run(&[("HOME", "/home/u"), ("AWS_PROFILE", "lab")]).unwrap(),
            pairs(&[
                ("aws_access_key_id", "AKLAB"),
                ("aws_secret_access_key", "secret-lab"),
                ("aws_session_token", "token-lab"),
                (
                    "aws_region",
                    "us-east-2 ; not a comment in AWS's format either, kept whole"
                ),
                ("aws_endpoint", "http://127.0.0.1:9000"),
            ])
        );
    }

    #[test]
    fn the_environment_wins_over_the_profile() {
        let got = run(&[
            ("HOME", "/home/u"),
            ("AWS_PROFILE", "lab"),
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_REGION", "us-west-1"),
            ("AWS_ENDPOINT_URL", "http://example"),
        ])
        .unwrap();
        assert!(got.is_empty(), "{got:?}");
        let got = run(&[
            ("HOME", "/home/u"),
            ("AWS_PROFILE", "lab"),
            ("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true"),
        ])
        .unwrap();
        assert!(got.iter().all(|(k, _)| k != "aws_endpoint"), "{got:?}");
    }

    #[test]
    fn files_from_the_environment_and_a_missing_profile() {
        // The files moved away: the default profile is simply absent ...
        assert_eq!(
            run(&[("HOME", "/home/u"), ("AWS_CONFIG_FILE", "/nowhere/config")]).unwrap(),
            pairs(&[
                ("aws_access_key_id", "AKDEFAULT"),
                ("aws_secret_access_key", "secret-default")
            ])
        );
        assert!(run(&[]).unwrap().is_empty());
        // ... and a named one that neither file holds is an error naming both files.
        let err = run(&[("HOME", "/home/u"), ("AWS_PROFILE", "nope")]).unwrap_err();
        assert!(
            err.contains("AWS_PROFILE=nope")
                && err.contains("/home/u/.aws/credentials")
                && err.contains("/home/u/.aws/config"),
            "{err}"
        );
        // An unreadable file is an error naming it, not a silent absence.
        let err = run(&[
            ("HOME", "/home/u"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/locked/credentials"),
        ])
        .unwrap_err();
        assert!(err.contains("/locked/credentials"), "{err}");
        // A profile with only an unsupported credential source adds no keys (a warning).
        assert!(run(&[("HOME", "/home/u"), ("AWS_PROFILE", "sso")]).unwrap().is_empty());
    }
}
