/**
 * Host side of the LVM lab tests: boots a user-mode-linux guest
 * (scripts/lab/uml-guest.ts) with fresh sparse disks and runs one guest
 * suite (test/lvm/guest/*.guest.ts) under vitest inside it. The guest's
 * verdict is vitest's exit code; its output is attached to a failure.
 */
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
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

/** Runs `test/lvm/guest/<file>` under vitest in a new guest; the disks are removed afterwards. */
export function runGuestSuite(file: string, opts: GuestSuiteOptions = {}): Promise<GuestResult> {
  return runGuestScript(`cd ${repoRoot()} && exec node node_modules/vitest/vitest.mjs run --config test/lvm/vitest.guest.config.ts ${process.env.BSN_LVM_VERBOSE ? '--reporter=verbose ' : ''}test/lvm/guest/${file}\n`, opts);
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
