-- TPC-C consistency conditions (spec clause 3.3.2). Each query returns the
-- number of rows that break its condition: 0 means it holds. Conditions
-- 1-4 are the ones the spec requires after a run; 5-9 (`--full`) scan every
-- order and order line. Used by `bench tpcc check`; one query per
-- "-- condition N" block.
-- condition 1: W_YTD = sum(D_YTD)
SELECT COUNT(*) FROM warehouse w
  JOIN (SELECT d_w_id, SUM(d_ytd) s FROM district GROUP BY d_w_id) d ON d.d_w_id = w.w_id
  WHERE w.w_ytd <> d.s;
-- condition 2: D_NEXT_O_ID - 1 = max(O_ID) = max(NO_O_ID)
SELECT COUNT(*) FROM district d
  JOIN (SELECT o_w_id, o_d_id, MAX(o_id) m FROM orders GROUP BY o_w_id, o_d_id) o
    ON o.o_w_id = d.d_w_id AND o.o_d_id = d.d_id
  LEFT JOIN (SELECT no_w_id, no_d_id, MAX(no_o_id) m FROM new_order GROUP BY no_w_id, no_d_id) n
    ON n.no_w_id = d.d_w_id AND n.no_d_id = d.d_id
  WHERE d.d_next_o_id - 1 <> o.m OR (n.m IS NOT NULL AND n.m <> o.m);
-- condition 3: max(NO_O_ID) - min(NO_O_ID) + 1 = rows in NEW-ORDER, per district
SELECT COUNT(*) FROM (SELECT no_w_id, no_d_id FROM new_order GROUP BY no_w_id, no_d_id
  HAVING MAX(no_o_id) - MIN(no_o_id) + 1 <> COUNT(*)) x;
-- condition 4: sum(O_OL_CNT) = rows in ORDER-LINE, per district
SELECT COUNT(*) FROM (SELECT o_w_id, o_d_id, SUM(o_ol_cnt) s FROM orders GROUP BY o_w_id, o_d_id) o
  LEFT JOIN (SELECT ol_w_id, ol_d_id, COUNT(*) c FROM order_line GROUP BY ol_w_id, ol_d_id) l
    ON l.ol_w_id = o.o_w_id AND l.ol_d_id = o.o_d_id
  WHERE l.c IS NULL OR l.c <> o.s;
-- condition 5: O_CARRIER_ID is null exactly when the order is in NEW-ORDER
SELECT COUNT(*) FROM orders o
  LEFT JOIN new_order n ON n.no_w_id = o.o_w_id AND n.no_d_id = o.o_d_id AND n.no_o_id = o.o_id
  WHERE (o.o_carrier_id IS NULL) <> (n.no_o_id IS NOT NULL);
-- condition 6: O_OL_CNT = the order's rows in ORDER-LINE
SELECT COUNT(*) FROM orders o
  LEFT JOIN (SELECT ol_w_id, ol_d_id, ol_o_id, COUNT(*) c FROM order_line GROUP BY ol_w_id, ol_d_id, ol_o_id) l
    ON l.ol_w_id = o.o_w_id AND l.ol_d_id = o.o_d_id AND l.ol_o_id = o.o_id
  WHERE l.c IS NULL OR l.c <> o.o_ol_cnt;
-- condition 7: OL_DELIVERY_D is null exactly when O_CARRIER_ID is null
SELECT COUNT(*) FROM order_line l
  JOIN orders o ON o.o_w_id = l.ol_w_id AND o.o_d_id = l.ol_d_id AND o.o_id = l.ol_o_id
  WHERE (l.ol_delivery_d IS NULL) <> (o.o_carrier_id IS NULL);
-- condition 8: W_YTD = sum(H_AMOUNT) of the warehouse
SELECT COUNT(*) FROM warehouse w
  JOIN (SELECT h_w_id, SUM(h_amount) s FROM history GROUP BY h_w_id) h ON h.h_w_id = w.w_id
  WHERE w.w_ytd <> h.s;
-- condition 9: D_YTD = sum(H_AMOUNT) of the district
SELECT COUNT(*) FROM district d
  JOIN (SELECT h_w_id, h_d_id, SUM(h_amount) s FROM history GROUP BY h_w_id, h_d_id) h
    ON h.h_w_id = d.d_w_id AND h.h_d_id = d.d_id
  WHERE d.d_ytd <> h.s;
