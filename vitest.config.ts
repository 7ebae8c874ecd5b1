import { defineConfig } from 'vitest/config';
import { BaseSequencer, type TestSpecification } from 'vitest/node';

/**
 * The longest files, longest first (seconds in the fresh-clone `.ci/run` of
 * 2026-11-30 17:04, quiet machine). Two workers take files from one queue:
 * a fresh clone has no duration cache, so vitest's own order left the LVM
 * guests' files for the end, one of them (212 s) running alone while the
 * other worker had nothing left — 1000 s of wall time for 1698 s of files.
 * Started first, the long ones overlap the many short host files instead.
 * A file missing here only runs in vitest's order; the list is a schedule,
 * not a selection.
 */
const LONGEST_FIRST = [
  'test/lvm/guest-suites.test.ts', // ≈ 300 est. (the four guest-suite files, 474 here, in one guest; 586 at load 8)
  'test/lvm/e2e-lvm.test.ts', // ≈ 140 est. (218 before its cut; 270 at load 7 with a guest beside it)
  'test/e2e/pg-matrix.test.ts', // 83
  'test/e2e/pg-standby-matrix.test.ts', // 66
  'test/e2e/crash-resume.test.ts', // 54
  'test/agent/pg-quiescer.test.ts', // 46
  'test/agent/pg-prepare.test.ts', // 45
  'test/e2e/tracker-workloads.test.ts', // 45
];

class LongestFirst extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const sorted = await super.sort(files);
    const rank = (f: TestSpecification): number => {
      const i = LONGEST_FIRST.findIndex((p) => f.moduleId.endsWith(`/${p}`));
      return i < 0 ? LONGEST_FIRST.length : i;
    };
    // Array.prototype.sort is stable: the rest keep vitest's order.
    return sorted.sort((a, b) => rank(a) - rank(b));
  }
}

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 180_000,
    // Tests that attach loop devices, start PostgreSQL or spawn daemons are
    // heavy on a 2-core machine; two files at a time keeps them honest.
    maxWorkers: 2,
    pool: 'forks',
    // One run's PostgreSQL template data directories (initdb once per build), removed at its end.
    globalSetup: ['test/support/pg-templates-setup.ts'],
    sequence: { sequencer: LongestFirst },
  },
});
