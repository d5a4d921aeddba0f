"""A local Cloud Storage server for the tests: the ``gcp-storage-emulator`` package, in memory, on
127.0.0.1, plus what it lacks of the real service's generations: the preconditions
``ifGenerationMatch`` on uploads, deletes and reads (``0``: "only if the object does not exist",
which the workdir lock relies on) and ``ifGenerationNotMatch`` on reads, and the
``x-goog-generation`` header of a read (TensorStore, under Orbax, needs both); and ``moveTo``,
with which gcsfs renames.

    python tests/gcs_emulator.py PORT BUCKET     # serves until killed

:func:`start` runs it as a subprocess and returns the environment that points gcsfs (``gs://``
paths through ``etils.epath``), google-cloud-storage (tensorboardX) and TensorStore (Orbax) at it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

# gcsfs asks the storage-control gRPC API for the bucket's layout before its first operation on a
# bucket; there is no such API here (with credentials present it waits 60 s before giving up).
# The core file system needs no layout.
ENV_NO_LAYOUT_LOOKUP = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def emulator_env(url: str) -> dict[str, str]:
  """The variables that send every client of this project to the server at ``url``."""
  return {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_CLOUD_PROJECT": "test",
    **ENV_NO_LAYOUT_LOOKUP,
  }


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(bucket: str = "bkt") -> tuple[subprocess.Popen, dict[str, str]]:
  """Starts the server; returns the process and the environment variables to set."""
  port = _free_port()
  proc = subprocess.Popen(
    [sys.executable, os.path.abspath(__file__), str(port), bucket],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), 0.2).close()
      break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        raise RuntimeError("the Cloud Storage emulator did not start") from None
      time.sleep(0.1)
  return proc, emulator_env(f"http://127.0.0.1:{port}")


def _with_preconditions(objects):
  """Wraps the emulator's object handlers so that ``ifGenerationMatch`` is honoured (412)."""
  from http import HTTPStatus  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top

  def current_generation(storage, bucket, name) -> int:
    try:
      return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return 0

  def guard(handler, name_of):
    def wrapped(request, response, storage, *args, **kwargs):
      want = request.query.get("ifGenerationMatch")
      if want and "upload_id" not in request.query:
        name = name_of(request)
        if name is not None and current_generation(
          storage, request.params["bucket_name"], name
        ) != int(want[0]):
          response.status = HTTPStatus.PRECONDITION_FAILED
          response.json({"error": {"code": 412, "message": "Precondition Failed"}})
          return None
      return handler(request, response, storage, *args, **kwargs)

    return wrapped

  def upload_name(request):
    if "name" in request.query:
      return request.query["name"][0]
    data = request.data if isinstance(request.data, dict) else {}
    return (data.get("meta") or {}).get("name") or data.get("name")  # multipart, resumable

  def download(request, response, storage, *args, **kwargs):
    # Reads carry the object's generation (TensorStore reads it from this header) and honour
    # ifGenerationNotMatch (304: the caller's cached copy is current).
    generation = current_generation(
      storage, request.params["bucket_name"], request.params["object_id"]
    )
    not_match = request.query.get("ifGenerationNotMatch")
    if generation and not_match and int(not_match[0]) == generation:
      response.status = HTTPStatus.NOT_MODIFIED
      response["x-goog-generation"] = str(generation)
      return None
    if generation:
      response["x-goog-generation"] = str(generation)
      response["x-goog-metageneration"] = "1"
    return original_download(request, response, storage, *args, **kwargs)

  original_download = objects.download
  return (
    guard(objects.insert, upload_name),
    guard(objects.delete, lambda request: request.params["object_id"]),
    guard(download, lambda request: request.params["object_id"]),
  )


def _move(objects):
  """``objects.move`` (``POST …/o/SRC/moveTo/o/DST``), which the emulator lacks: without it gcsfs
  retries for half a minute (501) before copying and deleting instead."""
  from http import HTTPStatus  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top

  def move(request, response, storage, *args, **kwargs):
    bucket = request.params["bucket_name"]
    try:
      obj = objects._copy(
        request.base_url,
        storage,
        bucket,  # pylint: disable=protected-access
        request.params["object_id"],
        bucket,
        request.params["dest_object_id"],
      )
      storage.delete_file(bucket, request.params["object_id"])
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return None
    response.json(obj)
    return None

  return move


def main(port: int, bucket: str):
  from gcp_storage_emulator import server, settings, storage  # pylint: disable=g-import-not-at-top

  # In memory there is nothing to persist, and the emulator re-serialises the metadata of every
  # object it holds after each write (quadratic in the objects of a run: minutes for a tiny one).
  storage.Storage._write_config_to_file = lambda self: None  # pylint: disable=protected-access
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  insert, delete, download = _with_preconditions(objects)
  replace = {objects.insert: insert, objects.delete: delete, objects.download: download}
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      handlers[method] = replace.get(handler, handler)
  objects.insert = insert  # the server's fallback for uploads posted without /upload
  move_route = (
    rf"^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
    rf"/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
    {"POST": _move(objects)},
  )
  server.HANDLERS = (move_route,) + tuple(server.HANDLERS)  # before the generic object route
  objects.download = download  # what objects.get calls for ?alt=media
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
