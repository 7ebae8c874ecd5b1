/**
 * Images in use by an operation of this appliance process (export, verify,
 * restore): an in-memory registry (DESIGN.md §12.1). A lease lives exactly as
 * long as the operation, and the process that holds it is the only one that
 * may delete images (the data directory's lock), so nothing needs to be
 * durable: after a crash there is no operation left to protect.
 */
export class ImageLeases {
  private readonly held = new Map<string, Map<number, string>>();
  private next = 1;

  /** Leases `ids` for `purpose`; call the returned function (once) when done. */
  acquire(ids: readonly string[], purpose: string): () => void {
    const token = this.next++;
    for (const id of ids) {
      let m = this.held.get(id);
      if (!m) this.held.set(id, (m = new Map()));
      m.set(token, purpose);
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      for (const id of ids) {
        const m = this.held.get(id);
        m?.delete(token);
        if (m && m.size === 0) this.held.delete(id);
      }
    };
  }

  /** What `id` is leased for, or undefined. */
  purposeOf(id: string): string | undefined {
    const m = this.held.get(id);
    return m ? [...new Set(m.values())].join(', ') : undefined;
  }

  /** Runs `fn` with `ids` leased. */
  async with<T>(ids: readonly string[], purpose: string, fn: () => Promise<T>): Promise<T> {
    const release = this.acquire(ids, purpose);
    try {
      return await fn();
    } finally {
      release();
    }
  }
}
