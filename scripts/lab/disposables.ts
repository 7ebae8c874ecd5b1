/**
 * What an end-to-end test creates, released in reverse order of creation.
 * Every step registers its release the moment its resource exists, so a
 * set-up that throws halfway leaves nothing behind once `dispose()` runs
 * (call it from afterAll: vitest runs afterAll also when beforeAll threw).
 * `dispose()` runs every release even when some fail, then throws: the one
 * error, or an AggregateError naming each failed step.
 */
export class Disposables {
  private readonly releases: { what: string; release: () => unknown }[] = [];

  /** Registers `release` to run at dispose (last registered, first run); returns `value`. */
  add<T>(what: string, value: T, release: (v: T) => unknown): T {
    this.releases.push({ what, release: () => release(value) });
    return value;
  }

  /** Registers a release that is not tied to a value (remove a directory, close a server, ...). */
  defer(what: string, release: () => unknown): void {
    this.releases.push({ what, release });
  }

  /** Releases everything registered so far, newest first; collects failures and throws them at the end. */
  async dispose(): Promise<void> {
    const errors: Error[] = [];
    for (let r = this.releases.pop(); r; r = this.releases.pop()) {
      try {
        await r.release();
      } catch (e) {
        errors.push(new Error(`releasing ${r.what} failed: ${e instanceof Error ? e.message : String(e)}`, { cause: e }));
      }
    }
    if (errors.length === 1) throw errors[0];
    if (errors.length > 1) throw new AggregateError(errors, `${errors.length} releases failed: ${errors.map((e) => e.message).join('; ')}`);
  }
}
