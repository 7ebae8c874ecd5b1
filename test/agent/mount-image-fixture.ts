/** Moved to scripts/lab/mount-image-fixture.ts (scripts/bench-mount.ts uses it; dist/ holds no test code): this path stays for the tests. */
export * from '../../scripts/lab/mount-image-fixture.js';
