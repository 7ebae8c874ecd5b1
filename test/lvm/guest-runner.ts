/**
 * Host side of the LVM lab tests: boots a user-mode-linux guest
 * (scripts/lab/uml-guest.ts) with fresh sparse disks and runs the guest
 * suites (test/lvm/guest/*.guest.ts) under vitest inside it, or a script.
 * The guest vitest's JSON report names each guest test's outcome; the
 * guest's output is attached to a failure.
 */
import { mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { runInGuest, type GuestResult } from '../../scripts/lab/uml-guest.js';
import { repoRoot } from '../../scripts/lab/processes.js';
import { umlUnavailable } from '../../scripts/lab/uml-kit.js';

/** Why LVM lab tests skip here (no apt, no network to download the kit), or null. Printed by every skip. */
export const labSkipReason: string | null = await umlUnavailable();
if (labSkipReason) console.warn(`LVM lab tests skipped: ${labSkipReason}`);

export interface GuestSuiteOptions {
  /** Sizes of the sparse disks /dev/ubda, /dev/ubdb, … in MiB. */
  disksMiB?: number[];
  timeoutMs?: number;
  network?: boolean;
  env?: Record<string, string>;
  /** Host folders the guest writes (shared read-write at the same path). */
  shared?: string[];
}

/** One guest test's outcome, from the guest vitest's JSON report. */
export interface GuestTest {
  name: string;
  status: string;
  durationMs: number;
  failureMessages: string[];
}

/** One guest file's outcome: `status` is vitest's ("passed" / "failed"), `message` a file-level error (a failed hook, an import). */
export interface GuestFileReport {
  status: string;
  message: string;
  tests: GuestTest[];
}

export interface GuestSuitesRun {
  result: GuestResult;
  /** Per guest file (its name under test/lvm/guest/); a file the report lacks is missing here. */
  files: Map<string, GuestFileReport>;
}

/**
 * Runs several guest suites (`test/lvm/guest/<file>`) in ONE guest boot and
 * ONE vitest invocation there (booting a guest and starting node and vitest
 * under ptrace costs tens of seconds each time). The guest vitest writes its
 * JSON report into a shared host folder, so the host can report each guest
 * test by name.
 */
export async function runGuestSuites(files: string[], opts: GuestSuiteOptions = {}): Promise<GuestSuitesRun> {
  const shared = await mkdtemp(path.join(os.tmpdir(), 'bsn-lvm-report-'));
  try {
    const report = path.join(shared, 'report.json');
    const reporters = `--reporter=${process.env.BSN_LVM_VERBOSE ? 'verbose' : 'default'} --reporter=json --outputFile.json=${report}`;
    const result = await runGuestScript(`cd ${repoRoot()} && exec node node_modules/vitest/vitest.mjs run --config test/lvm/vitest.guest.config.ts ${reporters} ` +
      `${files.map((f) => `test/lvm/guest/${f}`).join(' ')}\n`, { ...opts, shared: [...(opts.shared ?? []), shared] });
    const parsed = JSON.parse(await readFile(report, 'utf8').catch(() => '{}')) as {
      testResults?: Array<{ name: string; status: string; message: string; assertionResults: Array<{ fullName: string; status: string; duration?: number; failureMessages: string[] }> }>;
    };
    const out = new Map<string, GuestFileReport>();
    for (const f of parsed.testResults ?? []) {
      out.set(path.basename(f.name), {
        status: f.status,
        message: f.message,
        tests: f.assertionResults.map((t) => ({ name: t.fullName, status: t.status, durationMs: t.duration ?? 0, failureMessages: t.failureMessages })),
      });
    }
    return { result, files: out };
  } finally {
    await rm(shared, { recursive: true, force: true });
  }
}

/** Runs a shell script in a new guest with fresh sparse disks; the disks are removed afterwards. */
export async function runGuestScript(script: string, opts: GuestSuiteOptions = {}): Promise<GuestResult> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'bsn-lvm-disks-'));
  try {
    const disks = [];
    for (const [i, mib] of (opts.disksMiB ?? [1024]).entries()) {
      const f = path.join(dir, `disk${i}.img`);
      await writeFile(f, '');
      await truncate(f, mib * 1024 * 1024);
      disks.push({ file: f });
    }
    const r = await runInGuest({ disks, network: opts.network, env: opts.env, shared: opts.shared, timeoutMs: opts.timeoutMs ?? 240_000, script });
    // BSN_LVM_VERBOSE=1: the guest's own report (per-test durations inside the guest) also on success.
    if (process.env.BSN_LVM_VERBOSE) console.log(`guest ${r.seconds.toFixed(1)} s, exit ${r.code}\n${r.output}`);
    return r;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A failure message with the guest's output (vitest's report) and the tail of its console. */
export function explain(r: GuestResult): string {
  return `guest exit ${r.code}${r.timedOut ? ' (timed out)' : ''} after ${r.seconds.toFixed(1)} s\n${r.output}\n--- console ---\n${r.console.slice(-2000)}`;
}
