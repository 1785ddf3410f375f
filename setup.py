"""Build hooks: protoc generates wpdump.criu_pb from proto/*.proto; cffi builds wpdump._native; the C compiler
builds the wpdump-criu-hook program (native/hook_client.c), installed as a script."""

import os
import pathlib
import shutil
import subprocess
import tempfile

from setuptools import Command, setup
from setuptools.command.build import build
from distutils.command.build_scripts import build_scripts  # setuptools provides distutils

HERE = pathlib.Path(__file__).resolve().parent
PROTO_DIR = HERE / "proto"
PROTOS = ("pagemap", "inventory", "stats", "rpc")
OUT_DIR = HERE / "plugin" / "wpdump" / "criu_pb"
# protoc runs on copies under this prefix: descriptor file names become "wpdump/criu_pb/<name>.proto" (pycriu
# registers "<name>.proto" in the same default pool, and protobuf refuses two different files under one name)
# and the message classes' __module__ is the real wpdump.criu_pb.<name>_pb2.
PROTO_PREFIX = "wpdump/criu_pb"


class build_protos(Command):
    """Generate plugin/wpdump/criu_pb/*_pb2.py with protoc (Debian: protobuf-compiler)."""

    description = "generate wpdump.criu_pb from proto/*.proto with protoc"
    user_options: list = []

    def initialize_options(self) -> None:
        self.editable_mode = False  # set by setuptools' editable_wheel; generation is the same

    def finalize_options(self) -> None:
        pass

    def get_outputs(self) -> list[str]:
        return []  # written into the source package, which build_py (or an editable install) then picks up

    def get_output_mapping(self) -> dict[str, str]:
        return {}

    def get_source_files(self) -> list[str]:
        return [str(PROTO_DIR / f"{name}.proto") for name in PROTOS]

    def run(self) -> None:
        protoc = shutil.which("protoc")
        if protoc is None:
            raise SystemExit(
                "error: wpdump needs protoc to generate wpdump.criu_pb from proto/*.proto, and it is not on "
                "PATH: install it (Debian: apt-get install protobuf-compiler) or run tools/setup"
            )
        with tempfile.TemporaryDirectory() as tmp:
            stage = pathlib.Path(tmp) / PROTO_PREFIX
            stage.mkdir(parents=True)
            for name in PROTOS:
                shutil.copyfile(PROTO_DIR / f"{name}.proto", stage / f"{name}.proto")
            cmd = [protoc, f"--proto_path={tmp}", f"--python_out={tmp}"]
            cmd += [f"{PROTO_PREFIX}/{name}.proto" for name in PROTOS]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"error: {' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
            OUT_DIR.mkdir(exist_ok=True)
            for name in PROTOS:
                shutil.copyfile(stage / f"{name}_pb2.py", OUT_DIR / f"{name}_pb2.py")
        self.announce(f"generated {OUT_DIR}/{{{','.join(PROTOS)}}}_pb2.py", level=2)


class build_with_protos(build):
    """``build`` running build_protos first, so build_py (and editable installs) see the modules."""

    sub_commands = [("build_protos", None), *build.sub_commands]


# Scripts compiled from C, by source: CRIU's action script runs inside its frozen window, where a Python start-up
# alone costs 30-40 ms.
C_SCRIPTS = {"native/hook_client.c": "wpdump-criu-hook"}


class build_scripts_c(build_scripts):
    """``build_scripts`` that compiles the C_SCRIPTS into the scripts' build directory (setuptools would read them
    as text scripts to fix their ``#!`` line); other scripts as usual. Editable installs run it too."""

    def copy_scripts(self) -> tuple[list[str], list[str]]:
        from distutils.ccompiler import new_compiler
        from distutils.sysconfig import customize_compiler

        text = [s for s in self.scripts if s not in C_SCRIPTS]
        outfiles, updated = [], []
        if text:
            self.scripts = text
            outfiles, updated = super().copy_scripts()
        cc = new_compiler()
        customize_compiler(cc)
        self.mkpath(self.build_dir)
        for src, name in C_SCRIPTS.items():
            with tempfile.TemporaryDirectory() as tmp:
                objs = cc.compile([str(HERE / src)], output_dir=tmp, extra_postargs=["-O2", "-Wall", "-Wextra"])
                cc.link_executable(objs, name, output_dir=self.build_dir)
            out = os.path.join(self.build_dir, name)
            outfiles.append(out)
            updated.append(out)
        return outfiles, updated


setup(
    cffi_modules=["native/build_native.py:ffibuilder"],
    cmdclass={"build": build_with_protos, "build_protos": build_protos, "build_scripts": build_scripts_c},
    scripts=list(C_SCRIPTS),
)
