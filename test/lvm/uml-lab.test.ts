/**
 * The lab itself (scripts/lab/uml-guest.ts): a guest boots, runs a script
 * with real LVM, returns its exit code and output, and leaves no run folder.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { runInGuest } from '../../scripts/lab/uml-guest.js';
import { labSkipReason } from './guest-runner.js';

describe.skipIf(labSkipReason)('user-mode-linux lab', () => {
  it('runs a script with real LVM in the guest, returns its exit code and output, and releases its run folder', async () => {
    const ok = await runInGuest({
      timeoutMs: 90_000,
      script: 'set -e\n' +
        'grep -q dm_thin_pool /proc/modules && echo thin-ok\nlvm version | head -1\nexit 7\n',
    });
    expect(ok.code, ok.output + ok.console).toBe(7);
    expect(ok.output).toContain('thin-ok');
    expect(ok.output).toMatch(/LVM version/);
    expect(existsSync(ok.runDir)).toBe(false);
  });

  it('shows a host folder under /tmp (where the guest has its own tmpfs) at the same path; the guest\'s writes there stay in the guest', async () => {
    // A checkout under /tmp was invisible in the guest (its /tmp is a tmpfs): the checkout is mounted this way.
    const dir = await mkdtemp(path.join(os.tmpdir(), 'bsn-lab-ro-'));
    try {
      await writeFile(path.join(dir, 'hello'), 'from the host');
      const r = await runInGuest({ timeoutMs: 90_000, readOnly: [dir], script: `cat ${dir}/hello && echo guest > ${dir}/written && cat ${dir}/written\n` });
      expect(r.code, r.output + r.console).toBe(0);
      expect(r.output).toContain('from the host');
      expect(r.output).toContain('guest');
      expect(existsSync(path.join(dir, 'written'))).toBe(false);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('kills a guest that overruns its deadline and reports the timeout', async () => {
    const r = await runInGuest({ timeoutMs: 8_000, script: 'sleep 600\n' });
    expect(r.timedOut).toBe(true);
    expect(r.code).toBe(124);
    expect(existsSync(r.runDir)).toBe(false);
  });
});
