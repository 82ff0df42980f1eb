"""Operations on a `Repository`: pack, export, verify, gc, doctor, push/pull."""
