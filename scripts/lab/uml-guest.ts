/**
 * Boots a user-mode-linux guest, runs one shell script inside as root and
 * returns its exit code and output (../shared/LAB.md: hostfs root +
 * overlay, lvm.conf without udev, slirp networking, insmod of the dm
 * modules, the result through a hostfs folder).
 *
 * The guest sees the host's `/` read-only through hostfs, with the kit
 * (uml-kit.ts) as an extra lower layer and a tmpfs upper layer, so the
 * host's node, PostgreSQL binaries and this project's dist/ run inside it
 * unchanged. One folder per run (`RUN`) is shared read-write: the script
 * goes in, `out.log` and `rc` come out. UML itself always exits 0, so `rc`
 * is the script's verdict; a guest that writes no `rc` before the deadline
 * is killed and reported as a timeout.
 *
 * Everything a run makes — its RUN folder (uml_dir, COW files, logs), the
 * UML process group — is released before runInGuest returns, whatever the
 * outcome. Disk images passed in belong to the caller. If this process is
 * killed, the guest still powers off at its own deadline (`timeout` around
 * the script inside) and the RUN folder is in a test ledger (ledger.ts) that
 * `npm run cleanup` releases.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { Ledger } from './ledger.js';
import { repoRoot } from './processes.js';
import { ensureUmlKit, type UmlKit } from './uml-kit.js';

export interface GuestDisk {
  /** The disk file (read-only base when `cow` is set). */
  file: string;
  /** A COW file over `file` (UML's `ubdN=cow,base`): the base stays untouched. Created if missing. */
  cow?: string;
}

export interface GuestRunOptions {
  /** Shell script (sh) run as root inside the guest after the lab is set up. */
  script: string;
  /** ubda, ubdb, …: /dev/ubda is disks[0]. */
  disks?: GuestDisk[];
  timeoutMs?: number;
  memMb?: number;
  /** eth0 through slirp: the host's 127.0.0.1:PORT is 10.0.2.2:PORT in the guest. */
  network?: boolean;
  /** Extra environment for the script (values must not contain spaces or quotes). */
  env?: Record<string, string>;
  /** Host folders the guest mounts read-write at the same path (besides RUN). */
  shared?: string[];
  /**
   * Host folders the guest sees at the same path, read-only on the host: a
   * hostfs mount under a tmpfs overlay, so the guest's writes (vite's
   * node_modules/.vite-temp) land in its memory, as for the rest of `/`.
   * The project's checkout (repoRoot) is always one: the guest mounts its
   * own tmpfs on /tmp and /run, so a checkout there would otherwise be hidden.
   */
  readOnly?: string[];
}

export interface GuestResult {
  code: number;
  /** The script's stdout + stderr. */
  output: string;
  /** The kernel console (boot log, panics). */
  console: string;
  seconds: number;
  timedOut: boolean;
  /** The run folder the guest used (already removed). */
  runDir: string;
}

const DM_MODULES = [
  'kernel/drivers/md/dm-mod.ko', 'kernel/drivers/md/dm-bufio.ko', 'kernel/drivers/md/persistent-data/dm-persistent-data.ko',
  'kernel/drivers/md/dm-bio-prison.ko', 'kernel/drivers/md/dm-snapshot.ko', 'kernel/drivers/md/dm-thin-pool.ko', 'kernel/drivers/md/dm-era.ko',
];

/** PID 1: builds the writable root and chroots into it. */
function initScript(kit: UmlKit, run: string, shared: string[], readOnly: string[]): string {
  return `#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/kit /run/ov/u /run/ov/w /run/ov/m
mount -t hostfs -o ${kit.root} hostfs /run/kit
ln -s /run/kit/usr/bin/kmod /run/insmod
/run/insmod /run/kit/usr/lib/modules/${kit.version}/kernel/fs/overlayfs/overlay.ko
mount -t overlay overlay -o lowerdir=/run/kit:/,upperdir=/run/ov/u,workdir=/run/ov/w /run/ov/m || { echo "overlay failed"; echo o > /proc/sysrq-trigger; }
cd /run/ov/m
mount -t proc proc proc
mount -t sysfs sysfs sys
mount -t devtmpfs devtmpfs dev 2>/dev/null || mount -t tmpfs tmpfs dev
# UML's devtmpfs holds ~600 tty nodes; every LVM command stats all of /dev (no udev), and each
# syscall costs a ptrace round trip: without them an lvs takes about half the time (measured).
rm -f dev/ttyS* dev/pty[a-z]* dev/tty[a-z][0-9a-f] dev/tty[2-9] dev/tty[1-9][0-9]*
mkdir -p dev/pts dev/shm && mount -t devpts devpts dev/pts && mount -t tmpfs tmpfs dev/shm
mount -t tmpfs tmpfs tmp
mount -t tmpfs tmpfs run
mount -t tracefs tracefs sys/kernel/tracing 2>/dev/null
${readOnly.map((d, i) => `mkdir -p /run/ro${i}/l /run/ro${i}/u /run/ro${i}/w .${d} && mount -r -t hostfs -o ${d} hostfs /run/ro${i}/l && ` +
    `mount -t overlay overlay -o lowerdir=/run/ro${i}/l,upperdir=/run/ro${i}/u,workdir=/run/ro${i}/w .${d}`).join('\n')}
${[run, ...shared].map((d) => `mkdir -p .${d} && mount -t hostfs -o ${d} hostfs .${d}`).join('\n')}
exec chroot . /bin/sh ${run}/stage2.sh
`;
}

/** Inside the chroot: modules, LVM config, network, then the caller's script. */
function stage2Script(kit: UmlKit, run: string, opts: GuestRunOptions): string {
  const env = Object.entries(opts.env ?? {}).map(([k, v]) => `export ${k}='${v}'`).join('\n');
  return `#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mkdir -p /root /run/lvm /run/lock/lvm /etc/lvm
for m in ${DM_MODULES.map((m) => `/lib/modules/${kit.version}/${m}`).join(' ')}; do insmod $m 2>>${run}/setup.log; done
cat > /etc/lvm/lvm.conf <<'EOF'
devices {
  obtain_device_list_from_udev = 0
  scan = [ "/dev" ]
  # Only the guest's disks: every command scans less (the guest CPU is slow).
  global_filter = [ "a|^/dev/ubd[a-z]$|", "r|.*|" ]
  md_component_detection = 0
  fw_raid_component_detection = 0
  multipath_component_detection = 0
  hints = "none"
}
backup {
  backup = 0
  archive = 0
}
activation {
  udev_sync = 0
  udev_rules = 0
  monitoring = 0
  thin_pool_autoextend_threshold = 100
  # Less work per command on the slow ptrace CPU (measured: a thin snapshot create + activate +
  # remove 3.6 s -> 1.9 s): no 8 MiB reserve touched and no per-mapping mlock, no extra table checks.
  reserved_memory = 0
  use_mlockall = 1
  verify_udev_operations = 0
  checks = 0
}
global {
  event_activation = 0
  use_lvmetad = 0
  notify_dbus = 0
  use_lvmpolld = 0
}
EOF
${opts.network ? `ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
# slirp learns the framing from the first packet
timeout 2 bash -c 'exec 3<>/dev/tcp/10.0.2.2/9' >/dev/null 2>&1 || true` : 'ip link set lo up 2>/dev/null'}
${env}
export BSN_RUN=${run}
cd ${run}
# The guest's own deadline: if the host side died (kill -9 of the test), the guest still powers off.
timeout -k 5 ${Math.ceil((opts.timeoutMs ?? 120_000) / 1000) + 5} sh ${run}/script.sh > ${run}/out.log 2>&1
echo $? > ${run}/rc.tmp
sync
mv ${run}/rc.tmp ${run}/rc
echo o > /proc/sysrq-trigger
sleep 30
`;
}

/** Boots a guest, runs `opts.script`, powers it off; see the file comment. */
export async function runInGuest(opts: GuestRunOptions): Promise<GuestResult> {
  const kit = await ensureUmlKit();
  const run = await mkdtemp(path.join(os.tmpdir(), 'bsn-uml-'));
  // A killed test leaves the run folder: the ledger lets `npm run cleanup` remove it once this process is dead.
  const ledger = await Ledger.create(`uml guest ${run}`);
  await ledger.add({ kind: 'dir', path: run });
  const started = performance.now();
  let child: ReturnType<typeof spawn> | null = null;
  try {
    await writeFile(path.join(run, 'init.sh'), initScript(kit, run, opts.shared ?? [], [...new Set([repoRoot(), ...(opts.readOnly ?? [])])]));
    await chmod(path.join(run, 'init.sh'), 0o755);
    await writeFile(path.join(run, 'stage2.sh'), stage2Script(kit, run, opts));
    await writeFile(path.join(run, 'script.sh'), opts.script);
    await mkdir(path.join(run, 'uml'));
    const args = [
      `mem=${opts.memMb ?? 1024}M`, 'rootfstype=hostfs', 'rootflags=/', 'ro', `init=${run}/init.sh`,
      `uml_dir=${run}/uml`, 'umid=bsn', 'con=null', 'con0=null,fd:1', 'quiet', `BSN_RUN=${run}`,
    ];
    (opts.disks ?? []).forEach((d, i) => args.push(d.cow ? `ubd${i}=${d.cow},${d.file}` : `ubd${i}=${d.file}`));
    if (opts.network) args.push(`eth0=slirp,,${kit.slirp}`);
    let consoleOut = '';
    // Its own process group: UML forks helper processes; all go with one kill of the group.
    child = spawn(kit.kernel, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, TMPDIR: existsSync('/dev/shm') ? '/dev/shm' : run } });
    child.stdout!.on('data', (b: Buffer) => (consoleOut = (consoleOut + b.toString()).slice(-200_000)));
    child.stderr!.on('data', (b: Buffer) => (consoleOut = (consoleOut + b.toString()).slice(-200_000)));
    const exited = new Promise<void>((resolve) => child!.once('exit', () => resolve()));
    const deadline = opts.timeoutMs ?? 120_000;
    const timer = new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), deadline).unref());
    const outcome = await Promise.race([exited.then(() => 'exit' as const), timer]);
    const rcFile = path.join(run, 'rc');
    const timedOut = outcome === 'timeout' && !existsSync(rcFile);
    killGroup(child.pid!);
    await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
    const output = await readFile(path.join(run, 'out.log'), 'utf8').catch(() => '');
    const setup = await readFile(path.join(run, 'setup.log'), 'utf8').catch(() => '');
    const rc = await readFile(rcFile, 'utf8').catch(() => null);
    const code = rc === null ? (timedOut ? 124 : 125) : Number(rc.trim());
    return { code, output: setup ? `${setup}${output}` : output, console: consoleOut, seconds: (performance.now() - started) / 1000, timedOut, runDir: run };
  } catch (e) {
    throw new BlocksnapError('E_INTERNAL', `user-mode-linux guest failed: ${(e as Error).message}`, { cause: e });
  } finally {
    if (child?.pid) killGroup(child.pid);
    await rm(run, { recursive: true, force: true });
    await ledger.delete();
  }
}

function killGroup(pid: number): void {
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    // already gone
  }
}
