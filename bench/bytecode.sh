# Sourced by the GPU scripts (device.sh, facts_landscape.sh): bytecode for every module a process
# imports, as a normal install has (pip compiles at install). The staged wheels went in with
# --no-compile, and the machine's own torch sits in a read-only site-packages without bytecode for
# the modules torch imports only when asked (dynamo, inductor, DTensor, sympy): each new process
# compiled some 600 of them from source, 2.2 s of a shared trainer's model load and first capture
# (bench/results/h100-2026-12-06-sitting7/start_profile_*.txt). All of it is kept under
# /tmp/pycache, compiled once per machine.
export PYTHONPYCACHEPREFIX=/tmp/pycache
if [ ! -f /tmp/pycache/.compiled ]; then
  where=$(python -c "import importlib.util as u, os, sysconfig
print(os.path.dirname(u.find_spec('torch').submodule_search_locations[0]), sysconfig.get_paths()['stdlib'])")
  # shellcheck disable=SC2086 - two paths, split on purpose
  python -m compileall -q -j 0 /tmp/site $where >/dev/null 2>&1
  mkdir -p /tmp/pycache && touch /tmp/pycache/.compiled
fi
