"""Headless Chromium driven over the DevTools protocol, for the tests of pages the project writes.

Debian's ``chromium`` package (``/usr/bin/chromium``; ``.ci/run`` installs it) is started with
``--remote-debugging-pipe``: commands and replies are JSON messages, each ended by a NUL byte, on
the browser's file descriptors 3 (in) and 4 (out). No browser download and no Python package
beyond the standard library. Every JavaScript exception, ``console.error``/``console.assert``,
error entry of the browser log and dialog (``alert``) is recorded in :attr:`Browser.errors`.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
  for name in CHROMIUM:
    path = shutil.which(name)
    if path:
      return path
  return None


class BrowserError(RuntimeError):
  pass


class Browser:
  """One headless Chromium with one page (a context manager)."""

  def __init__(self, executable: str, width: int = 1280, height: int = 900, timeout: float = 60.0):
    self.timeout = timeout
    self.errors: list[str] = []
    self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
    cmd_r, self._cmd_w = os.pipe()
    self._out_r, out_w = os.pipe()

    def child_fds():  # the browser reads commands on fd 3 and writes replies on fd 4
      # Moved above 4 first, so that neither dup2 overwrites the other end (pipes are made
      # non-inheritable; dup2 makes the copies inheritable).
      cmd, out = os.dup(cmd_r), os.dup(out_w)
      cmd, out = os.dup2(cmd, 10), os.dup2(out, 11)
      os.dup2(cmd, 3)
      os.dup2(out, 4)

    flags = [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-extensions",
      "--disable-dev-shm-usage",
      "--hide-scrollbars",
      f"--window-size={width},{height}",
      f"--user-data-dir={self._profile}",
      "--remote-debugging-pipe",
      "about:blank",
    ]
    log = open(os.path.join(self._profile, "stderr.log"), "wb")
    self._proc = subprocess.Popen(
      [executable, *flags],
      stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL,
      stderr=log,
      close_fds=False,
      preexec_fn=child_fds,
    )
    log.close()
    os.close(cmd_r)
    os.close(out_w)
    self._buffer = b""
    self._next_id = 0
    self._events: list[dict] = []
    target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
      "sessionId"
    ]
    for domain in ("Page", "Runtime", "Log"):
      self.call(f"{domain}.enable")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    try:
      self.send("Browser.close")
    except Exception:  # pylint: disable=broad-except  (already gone)
      pass
    try:
      self._proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      self._proc.wait()
    for fd in (self._cmd_w, self._out_r):
      try:
        os.close(fd)
      except OSError:
        pass
    shutil.rmtree(self._profile, ignore_errors=True)

  # --------------------------------------------------------------------------- the protocol

  def _read_message(self, deadline: float) -> dict:
    while b"\0" not in self._buffer:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
        raise BrowserError("no answer from Chromium in time")
      chunk = os.read(self._out_r, 1 << 20)
      if not chunk:
        raise BrowserError(f"Chromium exited (code {self._proc.poll()})")
      self._buffer += chunk
    raw, self._buffer = self._buffer.split(b"\0", 1)
    return json.loads(raw)

  def _record(self, msg: dict):
    method, params = msg.get("method"), msg.get("params", {})
    if method == "Runtime.exceptionThrown":
      d = params["exceptionDetails"]
      self.errors.append(
        "exception: " + (d.get("exception", {}).get("description") or d.get("text", ""))
      )
    elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
      self.errors.append(
        "console."
        + params["type"]
        + ": "
        + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
      )
    elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
      self.errors.append("log: " + params["entry"].get("text", ""))
    elif method == "Page.javascriptDialogOpening":
      self.errors.append(f"dialog: {params.get('type')} {params.get('message')!r}")
      self.call("Page.handleJavaScriptDialog", {"accept": True}, wait=False)
    self._events.append(msg)

  def send(
    self, method: str, params: dict | None = None, session: str | None = None, wait: bool = True
  ) -> dict:
    self._next_id += 1
    msg = {"id": self._next_id, "method": method, "params": params or {}}
    if session:
      msg["sessionId"] = session
    os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
    if not wait:
      return {}
    deadline = time.monotonic() + self.timeout
    while True:
      reply = self._read_message(deadline)
      if reply.get("id") == self._next_id:
        if "error" in reply:
          raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})
      self._record(reply)

  def call(self, method: str, params: dict | None = None, wait: bool = True) -> dict:
    """A command to the page's session."""
    return self.send(method, params, self._session, wait)

  def wait_for(self, method: str, timeout: float | None = None) -> dict:
    deadline = time.monotonic() + (timeout or self.timeout)
    for i, msg in enumerate(self._events):
      if msg.get("method") == method:
        return self._events.pop(i)
    while True:
      msg = self._read_message(deadline)
      self._record(msg)
      if msg.get("method") == method:
        self._events.remove(msg)
        return msg

  # ------------------------------------------------------------------------------- a page

  def open(self, url: str):
    """Loads ``url`` and waits for its load event."""
    self._events = [m for m in self._events if m.get("method") != "Page.loadEventFired"]
    self.call("Page.navigate", {"url": url})
    self.wait_for("Page.loadEventFired")

  def evaluate(self, expression: str):
    """The value of a JavaScript expression (JSON-able), run in the page."""
    result = self.call(
      "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
    )
    if "exceptionDetails" in result:
      raise BrowserError(f"{expression[:80]}: {result['exceptionDetails']}")
    return result["result"].get("value")

  def screenshot(self, path: str, full_page: bool = True):
    """A PNG of the page (``full_page``: all of it, else the window)."""
    data = self.call(
      "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": full_page}
    )
    with open(path, "wb") as f:
      f.write(base64.b64decode(data["data"]))
