//! Sandboxed JavaScript for patch expressions, on an embedded QuickJS (rquickjs).
//!
//! ```text
//!  expression ──compile once──► Script (a JS function (value, valueExists, context) => expr)
//!  value, context ──JSON──► call with a deadline and a memory limit ──JSON──► Some(value) | None (removed)
//! ```
//!
//! The engine has no file system, network, modules or timers: only the language, `JSON`, and the
//! helpers `btoa`/`atob`. Each evaluation is interrupted past its time limit, and the runtime has a
//! memory limit; an endless loop, a throw, exhaustion or a result that is not JSON is an error,
//! never a crash or a stall.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rquickjs::{Context, Function, Object, Runtime};
use serde_json::Value;

/// Limits of one engine.
#[derive(Clone, Copy, Debug)]
pub struct ScriptLimits {
    /// Longest evaluation.
    pub timeout: Duration,
    /// Heap limit of the runtime, in bytes.
    pub memory_bytes: usize,
    /// Stack limit, in bytes.
    pub stack_bytes: usize,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(100),
            memory_bytes: 16 << 20,
            stack_bytes: 256 << 10,
        }
    }
}

/// Why a script failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    /// The expression does not compile.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// The script threw.
    #[error("the expression threw: {0}")]
    Thrown(String),
    /// The script ran past its time limit.
    #[error("the expression ran longer than {0:?} and was stopped")]
    Timeout(Duration),
    /// The script returned something that is not JSON data (a function, a symbol, a cycle).
    #[error("the expression returned {0}, which is not JSON data")]
    BadResult(String),
    /// The engine itself failed (out of memory included).
    #[error("the script engine failed: {0}")]
    Engine(String),
}

/// `btoa`/`atob` (Latin-1 strings, as in browsers), defined in the sandbox.
const PRELUDE: &str = r#"
(function () {
  var A = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  globalThis.btoa = function (input) {
    var s = String(input), out = "";
    for (var i = 0; i < s.length; i += 3) {
      var a = s.charCodeAt(i), b = s.charCodeAt(i + 1), c = s.charCodeAt(i + 2);
      if (a > 255 || b > 255 || c > 255) throw new Error("btoa: the string contains characters outside Latin-1");
      var n = (a << 16) | ((b || 0) << 8) | (c || 0);
      out += A[(n >> 18) & 63] + A[(n >> 12) & 63] + (i + 1 < s.length ? A[(n >> 6) & 63] : "=") + (i + 2 < s.length ? A[n & 63] : "=");
    }
    return out;
  };
  globalThis.atob = function (input) {
    var s = String(input).replace(/[\s=]+/g, ""), out = "", bits = 0, acc = 0;
    for (var i = 0; i < s.length; i++) {
      var v = A.indexOf(s[i]);
      if (v < 0) throw new Error("atob: the string is not valid base64");
      acc = (acc << 6) | v; bits += 6;
      if (bits >= 8) { bits -= 8; out += String.fromCharCode((acc >> bits) & 255); }
    }
    return out;
  };
})();
"#;

/// A compiled expression, bound to the engine that compiled it. The function lives in the
/// engine (a hidden global table), so a Script is plain data: Send and Sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    slot: u32,
    /// Whether the expression mentions `context`: if not, no context is built or parsed for it.
    uses_context: bool,
}

impl Script {
    /// Whether the expression reads `context` (and so needs one).
    pub fn uses_context(&self) -> bool {
        self.uses_context
    }
}

/// Name of the hidden global table of compiled functions.
const SCRIPTS: &str = "__rcsyncScripts";

/// One sandboxed JavaScript runtime.
pub struct ScriptEngine {
    runtime: Runtime,
    context: Context,
    /// Deadline of the running evaluation, in nanoseconds since `epoch`; 0 when idle.
    deadline: Arc<AtomicU64>,
    epoch: Instant,
    limits: ScriptLimits,
    next_slot: AtomicU64,
}

fn engine_error(e: rquickjs::Error) -> ScriptError {
    ScriptError::Engine(e.to_string())
}

impl ScriptEngine {
    /// A fresh runtime with `limits`.
    pub fn new(limits: ScriptLimits) -> Result<Self, ScriptError> {
        let runtime = Runtime::new().map_err(engine_error)?;
        runtime.set_memory_limit(limits.memory_bytes);
        runtime.set_max_stack_size(limits.stack_bytes);
        let deadline = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        {
            let deadline = deadline.clone();
            runtime.set_interrupt_handler(Some(Box::new(move || {
                let d = deadline.load(Ordering::Relaxed);
                d != 0 && epoch.elapsed().as_nanos() as u64 > d
            })));
        }
        let context = Context::full(&runtime).map_err(engine_error)?;
        context
            .with(|ctx| ctx.eval::<(), _>(PRELUDE))
            .map_err(engine_error)?;
        context
            .with(|ctx| ctx.globals().set(SCRIPTS, Object::new(ctx.clone())?))
            .map_err(engine_error)?;
        Ok(Self {
            runtime,
            context,
            deadline,
            epoch,
            limits,
            next_slot: AtomicU64::new(0),
        })
    }

    /// Compiles an expression into a function of `value`, `valueExists` and `context`.
    pub fn compile(&self, expression: &str) -> Result<Script, ScriptError> {
        let source = format!("(function (value, valueExists, context) {{\n  return ({expression}\n  );\n}})");
        self.context.with(|ctx| match ctx.eval::<Function, _>(source) {
            Ok(function) => {
                let slot = self.next_slot.fetch_add(1, Ordering::Relaxed) as u32;
                let table: Object = ctx.globals().get(SCRIPTS).map_err(engine_error)?;
                table.set(slot, function).map_err(engine_error)?;
                Ok(Script {
                    slot,
                    uses_context: expression.contains("context"),
                })
            }
            Err(rquickjs::Error::Exception) => Err(ScriptError::Syntax(exception_text(&ctx))),
            Err(e) => Err(ScriptError::Syntax(e.to_string())),
        })
    }

    /// Runs a script. `value` is `None` when the field does not exist; `context_json` is the
    /// `context` object as JSON text (callers build it once per object, not per evaluation).
    /// Returns `None` when the script returns `null` or `undefined` (the field is removed).
    pub fn eval(
        &self,
        script: &Script,
        value: Option<&Value>,
        context_json: &str,
    ) -> Result<Option<Value>, ScriptError> {
        let value_json = serde_json::to_string(value.unwrap_or(&Value::Null)).expect("JSON values serialize");
        let context_json = context_json.to_string();
        let limit = self.epoch.elapsed() + self.limits.timeout;
        self.deadline.store(limit.as_nanos() as u64, Ordering::Relaxed);
        let result = self.context.with(|ctx| {
            let table: Object = ctx.globals().get(SCRIPTS).map_err(engine_error)?;
            let function: Function = table.get(script.slot).map_err(engine_error)?;
            let arg = ctx.json_parse(value_json).map_err(engine_error)?;
            let context = if script.uses_context {
                ctx.json_parse(context_json).map_err(engine_error)?
            } else {
                rquickjs::Value::new_undefined(ctx.clone())
            };
            let out: rquickjs::Value = match function.call((arg, value.is_some(), context)) {
                Ok(out) => out,
                Err(rquickjs::Error::Exception) => {
                    let text = exception_text(&ctx);
                    if text.contains("interrupted") {
                        return Err(ScriptError::Timeout(self.limits.timeout));
                    }
                    return Err(ScriptError::Thrown(text));
                }
                Err(e) => return Err(engine_error(e)),
            };
            if out.is_undefined() || out.is_null() {
                return Ok(None);
            }
            let kind = out.type_name().to_string();
            match ctx.json_stringify(out) {
                Ok(Some(text)) => {
                    let text = text.to_string().map_err(engine_error)?;
                    serde_json::from_str(&text)
                        .map(Some)
                        .map_err(|e| ScriptError::BadResult(format!("{kind} ({e})")))
                }
                Ok(None) => Err(ScriptError::BadResult(kind)),
                Err(rquickjs::Error::Exception) => Err(ScriptError::BadResult(format!(
                    "{kind}: {}",
                    exception_text(&ctx)
                ))),
                Err(e) => Err(engine_error(e)),
            }
        });
        self.deadline.store(0, Ordering::Relaxed);
        if result.is_err() {
            // A failed evaluation may have left cycles or a full heap: reclaim before the next one.
            self.runtime.run_gc();
        }
        result
    }
}

fn exception_text(ctx: &rquickjs::Ctx<'_>) -> String {
    let exception = ctx.catch();
    if let Some(e) = exception.as_exception() {
        e.message().unwrap_or_default()
    } else if let Some(s) = exception.as_string() {
        s.to_string().unwrap_or_default()
    } else {
        format!("{exception:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn engine() -> ScriptEngine {
        ScriptEngine::new(ScriptLimits {
            timeout: Duration::from_millis(50),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn expressions_see_value_exists_and_context() {
        let e = engine();
        let s = e.compile(r#"value === "gvisor" ? "sandboxed" : value"#).unwrap();
        assert_eq!(
            e.eval(&s, Some(&json!("gvisor")), "{}").unwrap(),
            Some(json!("sandboxed"))
        );
        assert_eq!(
            e.eval(&s, Some(&json!("kata")), "{}").unwrap(),
            Some(json!("kata"))
        );
        let s = e
            .compile("valueExists ? value : context.vcluster.name + '-' + context.path")
            .unwrap();
        let ctx = json!({"vcluster": {"name": "team-a"}, "path": "metadata.labels.x"}).to_string();
        assert_eq!(
            e.eval(&s, None, &ctx).unwrap(),
            Some(json!("team-a-metadata.labels.x"))
        );
        let s = e.compile("({a: [1, value]})").unwrap();
        assert_eq!(
            e.eval(&s, Some(&json!(2)), "{}").unwrap(),
            Some(json!({"a": [1, 2]}))
        );
    }

    #[test]
    fn null_and_undefined_remove() {
        let e = engine();
        for expr in ["null", "undefined", "void 0"] {
            assert_eq!(
                e.eval(&e.compile(expr).unwrap(), Some(&json!("x")), "{}")
                    .unwrap(),
                None,
                "{expr}"
            );
        }
    }

    #[test]
    fn helpers_btoa_and_atob() {
        let e = engine();
        let s = e
            .compile("[btoa(value), atob(btoa(value)), atob('aGVsbG8=')]")
            .unwrap();
        assert_eq!(
            e.eval(&s, Some(&json!("gvisor")), "{}").unwrap(),
            Some(json!(["Z3Zpc29y", "gvisor", "hello"]))
        );
    }

    #[test]
    fn failures_are_errors_not_crashes() {
        let e = engine();
        assert!(matches!(e.compile("value +"), Err(ScriptError::Syntax(_))));
        let throw = e.compile("(() => { throw new Error('nope') })()").unwrap();
        assert!(matches!(e.eval(&throw, None, "{}"), Err(ScriptError::Thrown(m)) if m.contains("nope")));
        let endless = e.compile("(() => { while (true) {} })()").unwrap();
        let started = Instant::now();
        assert!(matches!(
            e.eval(&endless, None, "{}"),
            Err(ScriptError::Timeout(_))
        ));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the endless loop was stopped"
        );
        let function = e.compile("(() => 1)").unwrap();
        assert!(matches!(
            e.eval(&function, None, "{}"),
            Err(ScriptError::BadResult(_))
        ));
        let hog = e
            .compile("(() => { var a = []; while (true) { a.push('x'.repeat(1 << 16)); } })()")
            .unwrap();
        assert!(e.eval(&hog, None, "{}").is_err(), "memory exhaustion is an error");
        // The engine still works afterwards.
        let ok = e.compile("value + 1").unwrap();
        assert_eq!(e.eval(&ok, Some(&json!(1)), "{}").unwrap(), Some(json!(2)));
    }

    #[test]
    fn the_sandbox_has_no_io() {
        let e = engine();
        let probe = e
            .compile("[typeof require, typeof fetch, typeof std, typeof os, typeof setTimeout]")
            .unwrap();
        assert_eq!(
            e.eval(&probe, None, "{}").unwrap(),
            Some(json!([
                "undefined",
                "undefined",
                "undefined",
                "undefined",
                "undefined"
            ]))
        );
    }
}
