"""Reads user data as cloud-init does at first boot, with cloud-init's own code, and prints as JSON what it
would act on: the merged cloud-config (validated against cloud-init's schema) and each script part.

    cloud-init-userdata FILE

Used by the tests (scripts/test-tools installs it as target/test-tools/bin/cloud-init-userdata): what ebb
sends must be what cloud-init understands, not what our own parser thinks it is.
"""
import json
import os
import sys
import tempfile

from cloudinit import handlers, helpers, user_data, util
from cloudinit.config.schema import get_schema, validate_cloudconfig_schema
from cloudinit.handlers.boot_hook import BootHookPartHandler
from cloudinit.handlers.cloud_config import CloudConfigPartHandler
from cloudinit.handlers.shell_script import ShellScriptPartHandler


class DataSource:
    def get_instance_id(self):
        return "i-ebb-test"


def main(path):
    with open(path, "rb") as f:
        blob = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        paths = helpers.Paths({"cloud_dir": tmp, "run_dir": tmp}, ds=DataSource())
        os.makedirs(paths.get_ipath_cur(), exist_ok=True)
        message = user_data.UserDataProcessor(paths).process(blob)
        registry = helpers.ContentHandlers()
        for handler in (
            CloudConfigPartHandler(paths),
            ShellScriptPartHandler(paths),
            BootHookPartHandler(paths, datasource=DataSource()),
        ):
            registry.register(handler)
        data = {
            "handlers": registry,
            "handlerdir": tmp,
            "data": None,
            "frequency": "once-per-instance",
            "handlercount": 0,
            "excluded": [],
        }
        for handler in {id(h): h for h in registry.registered.values()}.values():
            handlers.call_begin(handler, None, "once-per-instance")
        handlers.walk(message, handlers.walker_callback, data=data)
        for handler in {id(h): h for h in registry.registered.values()}.values():
            handlers.call_end(handler, None, "once-per-instance")
        merged_path = paths.get_ipath("cloud_config")
        merged = util.load_yaml(util.load_file(merged_path)) if os.path.exists(merged_path) else None
        scripts_dir = paths.get_ipath_cur("scripts")
        scripts = {}
        if os.path.isdir(scripts_dir):
            for name in sorted(os.listdir(scripts_dir)):
                full = os.path.join(scripts_dir, name)
                if os.path.isfile(full):
                    scripts[name] = util.load_file(full)
    schema_error = None
    if merged is not None:
        try:
            validate_cloudconfig_schema(merged, get_schema(), strict=True)
        except Exception as e:  # the validator's SchemaValidationError, or anything else: say it
            schema_error = str(e)
    parts = [part.get_content_type() for part in message.walk() if part.get_content_maintype() != "multipart"]
    json.dump(
        {"parts": parts, "cloud_config": merged, "scripts": scripts, "schema_error": schema_error},
        sys.stdout,
        indent=1,
        default=str,
    )
    print()


if __name__ == "__main__":
    main(sys.argv[1])
