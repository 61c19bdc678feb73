-- The log's row images and written fields are kept as `json`: the text exactly as written, only
-- checked to be JSON. As `jsonb`, Postgres parsed every image into a tree and rebuilt it in
-- binary on every merge, which cost about two thirds as much as writing the entry itself; nothing
-- queries inside them. Keys stay `jsonb`, so they still compare with `=`. Other writers' capture
-- trigger still builds `jsonb` images, stored through the assignment cast.
alter table synchub.change_log
    alter column new_row type json,
    alter column old_values type json,
    alter column written type json;
