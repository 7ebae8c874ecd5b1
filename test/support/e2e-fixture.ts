/** Moved to scripts/lab/e2e-fixture.ts (scripts/bench-mount.ts uses it; dist/ holds no test code): this path stays for the tests. */
export * from '../../scripts/lab/e2e-fixture.js';
